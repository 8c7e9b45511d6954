#!/usr/bin/env python
"""Benchmark the exported client half and the live per-frame path; write a markdown section.

    python scripts/bench_export.py --checkpoint runs/x/checkpoint --out bench_export.md

1. Client half, batch 1, one thread: torch fp32 eager (as trained, and with Conv+BN fused)
   against ONNX Runtime fp32 and int8 variants, with their agreement with fp32 through the
   server half on held-out synthetic crops.
2. The live per-frame path on one core (decode JPEG -> detect -> crop -> int8 client ->
   serialise a PREDICT wire message), on real photos (scikit-image's astronaut, matplotlib's
   grace_hopper.jpg), in a subprocess pinned to one CPU, with its peak RSS.
3. The device's re-quantization (export + calibrate + quantize): time and peak RSS by exporter.
Timings are medians; nothing here is asserted, the numbers are what this machine gives.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = ("decode", "detect", "crop", "infer", "serialize")


# ---- helpers -----------------------------------------------------------------------------------


def _cpu_name() -> str:
    """CPU model plus the int8 dot-product extensions that decide how fast int8 can be."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("model name", "hardware") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif key in ("flags", "features") and ":" in line:
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    found = [f for f in wanted if f in flags]
    return f"{name} ({', '.join(found) or 'no int8 dot-product extensions listed'})"


def _median_ms(fn: Any, runs: int, warmup: int = 50) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t
    return float(np.median(times) * 1e3), float(np.percentile(times, 90) * 1e3)


def _photos() -> dict[str, bytes]:
    """JPEG bytes of two real photos with one face each (quality 90, as a camera would send);
    the keys name them with their width x height."""
    import cv2
    import matplotlib
    import skimage.data

    grace = cv2.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    images = {
        "astronaut": cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR),
        "grace_hopper": grace,
    }
    out = {}
    for name, img in images.items():
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out[f"{name} {img.shape[1]}x{img.shape[0]}"] = buf.tobytes()
    return out


def _checkpoint_note(ckpt: Path) -> str:
    info = (ckpt if ckpt.is_dir() else ckpt.parent) / "checkpoint.json"
    try:
        data = json.loads(info.read_text())
        last = data["rounds"][-1]
        return (f" ({data['algo']}, {len(data['rounds'])} rounds, test accuracy "
                f"{last['test_accuracy']:.1%})")  # fmt: skip
    except (OSError, ValueError, KeyError, IndexError):
        return ""


def _maxrss_mb() -> float:
    """Peak RSS of this process image: VmHWM, else ru_maxrss.

    ru_maxrss survives fork and exec, so a child started by this (large) benchmark process
    would report the parent's peak; VmHWM belongs to the address space and starts afresh at exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- child processes -----------------------------------------------------------------------------


def frame_loop(args: argparse.Namespace) -> None:
    """The live path on one core; prints one JSON line."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2

    cv2.setNumThreads(1)
    if args.with_torch:  # the agent also trains: torch and the float client half are loaded
        import torch

        torch.set_num_threads(1)
        from splitfed.checkpoint import load_model

        load_model(Path(args.checkpoint))
    from splitfed.data.crop import CropConfig, EyeRegionCropper
    from splitfed.onnx_client import InferenceConfig, OnnxClient
    from splitfed.wire import MsgType, Sequencer, encode, pack_activations

    rss_start = _maxrss_mb()
    client = OnnxClient(Path(args.model), InferenceConfig(threads=1))
    cropper = EyeRegionCropper(CropConfig(detector=args.detector))
    seq = Sequencer("bench-01", "bench")
    photos = list(_photos().values())
    spent = dict.fromkeys(STAGES, 0.0)
    faces = 0
    misses = 0
    size = 0
    n = args.frames + 10
    t_all = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        frame = cv2.imdecode(np.frombuffer(photos[i % len(photos)], np.uint8), cv2.IMREAD_COLOR)
        t1 = time.perf_counter()
        det = cropper.detect(frame)
        t2 = time.perf_counter()
        if det is None:
            misses += 1
            continue
        crop = cropper.crop_at(frame, det)
        t3 = time.perf_counter()
        act = client.run_crops(crop[None])
        t4 = time.perf_counter()
        msg = seq.make(
            MsgType.PREDICT, 0, {"frame": i}, pack_activations(act, args.compression), ttl=5.0
        )
        data = encode(msg)
        t5 = time.perf_counter()
        if i < 10:  # warm-up
            continue
        faces += 1
        size = len(data)
        for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            spent[stage] += dt
        t_all += t5 - t0
    cropper.close()
    print(
        json.dumps(
            {
                "backend": cropper.backend,
                "frames": faces,
                "no_face": misses,
                "fps": faces / t_all if t_all else 0.0,
                "ms": {k: 1e3 * v / max(faces, 1) for k, v in spent.items()},
                "message_bytes": size,
                "rss_before_models_mb": rss_start,
                "maxrss_mb": _maxrss_mb(),
            }
        )
    )


def requant_child(args: argparse.Namespace) -> None:
    """One device re-quantization; prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    from export.onnx import requantize
    from splitfed.checkpoint import load_model
    from splitfed.data.synth import SynthConfig, generate_synth

    cfg, client, _ = load_model(Path(args.checkpoint))
    crops = generate_synth(SynthConfig(identities=4, per_emotion=5, seed=9)).images[:128]
    rss0 = _maxrss_mb()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        requantize(client, cfg, crops, Path(tmp), "bench", exporter=args.exporter)
    print(
        json.dumps(
            {"seconds": time.perf_counter() - t, "rss_before_mb": rss0, "maxrss_mb": _maxrss_mb()}
        )
    )


def train_checkpoint(rounds: int, identities: int) -> Path:
    """A centralized model on the synthetic set, as `aggregator simulate --algo centralized`."""
    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.simulate import SimSpec, simulate

    out = Path(tempfile.mkdtemp(prefix="bench-export-train-"))
    print(f"training a centralized model for {rounds} rounds in {out} ...", file=sys.stderr)
    data = generate_synth(SynthConfig(identities=identities))
    simulate(data, SimSpec(algo="centralized", clients=1, rounds=rounds, out_dir=out))
    return out / "checkpoint"


def _child(extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- the benchmark -----------------------------------------------------------------------------


def fused_copy(client: Any) -> Any:
    """The torch client with each Conv+BatchNorm pair folded (what export does too)."""
    import copy

    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    m = copy.deepcopy(client).eval()
    for block in m.blocks:
        layers = list(block)
        out: list[nn.Module] = []
        i = 0
        while i < len(layers):
            if (
                i + 1 < len(layers)
                and isinstance(layers[i], nn.Conv2d)
                and isinstance(layers[i + 1], nn.BatchNorm2d)
            ):
                out.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
                i += 2
            else:
                out.append(layers[i])
                i += 1
        block._modules.clear()
        for j, layer in enumerate(out):
            block.add_module(str(j), layer)
    return m


def bench(args: argparse.Namespace) -> str:
    import onnxruntime as ort
    import torch

    from export.onnx import QuantConfig, export_client, quantize_int8
    from splitfed.checkpoint import load_model
    from splitfed.data.batches import to_tensor
    from splitfed.data.dataset import train_test_split
    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.model import conv_macs, count_parameters, smashed_shape
    from splitfed.onnx_client import InferenceConfig, OnnxClient

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    ckpt = Path(args.checkpoint)
    cfg, client, server = load_model(ckpt)
    client.eval()
    server.eval()
    data = generate_synth(SynthConfig(identities=args.synth_identities))
    train, test = train_test_split(data, "subject", seed=0)
    calib = train.images[np.random.default_rng(0).choice(len(train), 256, replace=False)]
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    manifest = export_client(
        client, cfg, work, calibration=calib, server_net=server, full_model=True,
        eval_data=test, version="bench",
    )  # fmt: skip
    variants = {
        "int8 QDQ per-channel, first conv float (default)": QuantConfig(),
        "int8 QDQ per-channel, all convs int8": QuantConfig(float_first_conv=False),
        "int8 QDQ per-tensor, first conv float": QuantConfig(per_channel=False),
        "int8 QOperator per-channel, first conv float": QuantConfig(format="qoperator"),
        "int8 QDQ per-channel, reduce_range": QuantConfig(reduce_range=True),
        "int8 QDQ per-channel, S8S8 symmetric (TensorRT)": QuantConfig.for_providers(
            ["TensorrtExecutionProvider"]
        ),
    }
    paths = {"ORT fp32": work / "client_fp32.onnx"}
    for i, (name, q) in enumerate(variants.items()):
        path = work / f"variant{i}.onnx"
        quantize_int8(work / "client_fp32.onnx", path, calib, q)
        paths[f"ORT {name}"] = path

    x1 = to_tensor(test.images[:1])
    xt = to_tensor(test.images)
    with torch.no_grad():
        ref_smashed = client(xt).numpy()
        ref_pred = server(torch.from_numpy(ref_smashed)).argmax(1).numpy()
    labels = test.labels
    rows: list[tuple[str, float, float, str, str]] = []
    fused = fused_copy(client)
    with torch.no_grad():
        t_eager, p_eager = _median_ms(lambda: client(x1), args.runs)
        rows.append(("torch fp32 eager (as trained, BN separate)", t_eager, p_eager, "-", "-"))
        t, p = _median_ms(lambda: fused(x1), args.runs)
        diff = float((fused(xt) - torch.from_numpy(ref_smashed)).abs().max())
        rows.append(("torch fp32 eager, Conv+BN fused", t, p, "-", f"max diff {diff:.1e}"))
    x1n = x1.numpy()
    for name, path in paths.items():
        sess = OnnxClient(path, InferenceConfig(threads=1))
        t, p = _median_ms(lambda s=sess: s.run(x1n), args.runs)
        out = np.concatenate([sess.run(xt.numpy()[i : i + 256]) for i in range(0, len(xt), 256)])
        with torch.no_grad():
            pred = server(torch.from_numpy(out)).argmax(1).numpy()
        agree = f"{np.mean(pred == ref_pred):.1%}"
        acc = f"{np.mean(pred == labels):.1%} (fp32 {np.mean(ref_pred == labels):.1%})"
        rows.append((name, t, p, agree, acc))
    # All cores, for reference (the device config chooses the thread count).
    cores = os.cpu_count() or 1
    multi = []
    torch.set_num_threads(cores)
    with torch.no_grad():
        multi.append(("torch fp32 eager", *_median_ms(lambda: client(x1), args.runs)))
    for name in ("ORT fp32", "ORT int8 QDQ per-channel, first conv float (default)"):
        sess = OnnxClient(paths[name], InferenceConfig(threads=cores))
        multi.append((name, *_median_ms(lambda s=sess: s.run(x1.numpy()), args.runs)))
    torch.set_num_threads(1)

    default_int8 = work / "client_int8.onnx"
    loops = {}
    for detector in ("mediapipe", "haar"):
        for with_torch in (False, True):
            extra = ["--frame-loop", "--model", str(default_int8), "--detector", detector,
                     "--frames", str(args.frames), "--checkpoint", str(ckpt)]  # fmt: skip
            if with_torch:
                extra.append("--with-torch")
            loops[(detector, with_torch)] = _child(extra)
    fp32_model = str(work / "client_fp32.onnx")
    fp32_loop = _child(["--frame-loop", "--model", fp32_model, "--detector", "mediapipe",
                        "--frames", str(args.frames), "--checkpoint", str(ckpt)])  # fmt: skip
    msg_sizes = {}
    for comp in ("fp32", "fp16", "int8"):
        r = _child(["--frame-loop", "--model", str(default_int8), "--detector", "mediapipe",
                    "--frames", "5", "--compression", comp, "--checkpoint", str(ckpt)])  # fmt: skip
        msg_sizes[comp] = r["message_bytes"]
    requant = {e: _child(["--requant-child", "--exporter", e, "--checkpoint", str(ckpt)])
               for e in ("torchscript", "dynamo")}  # fmt: skip

    # ---- markdown ----
    p = manifest["parity"]
    lines = [
        "## ONNX client half and the live per-frame path (`scripts/bench_export.py`)",
        "",
        f"Machine: {_cpu_name()}, {cores} cores visible; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; {time.strftime('%Y-%m-%d')}; 1-minute load average "
        f"{load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (a shared "
        "machine: medians, and p90 shows the interference).",
        f"Model: checkpoint `{ckpt}`{_checkpoint_note(ckpt)}, "
        f"input {tuple(cfg.input_shape)}, cut {cfg.cut}, smashed {smashed_shape(cfg)}; client "
        f"half {count_parameters(client):,} parameters, "
        f"{conv_macs(client, tuple(cfg.input_shape)) / 1e6:.2f} M MACs per crop.",
        "Held-out data: synthetic test split "
        f"({len(test)} crops, {args.synth_identities} synthetic people in the set); "
        "agreement = same top-1 class through the torch server half as the fp32 client.",
        "",
        f"### Client half, batch 1, one thread (median of {args.runs} runs)",
        "",
        "| model | median ms | p90 ms | vs torch eager | top-1 agreement | test accuracy |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, t, p90, agree, acc in rows:
        lines.append(f"| {name} | {t:.3f} | {p90:.3f} | {t_eager / t:.1f}x | {agree} | {acc} |")
    lines += [
        "",
        f"All {cores} cores: "
        + "; ".join(f"{name} {t:.3f} ms (p90 {p90:.3f})" for name, t, p90 in multi)
        + ".",
        "",
        "Parity recorded by the export (manifest.json): ONNX fp32 vs torch max |diff| "
        f"{p['fp32_max_abs_diff']:.1e} (limit 1e-4); default int8 vs fp32: top-1 agreement "
        f"{p['int8_top1_agreement']:.1%}, test accuracy {p['fp32_accuracy']:.1%} -> "
        f"{p['int8_accuracy']:.1%} (drop {p['int8_accuracy_drop_points']:.2f} points, target "
        f"<= 1), smashed-data relative RMS error {p['int8_smashed_rel_rmse']:.3f}; full model "
        f"int8 agreement {p['full_int8_top1_agreement']:.1%}.",
        "",
        "### Model files",
        "",
        "| file | bytes |",
        "|---|---:|",
    ]
    for entry in manifest["files"].values():
        lines.append(f"| {entry['path']} | {entry['bytes']:,} |")
    lines += [
        "",
        f"### Per-frame path on one core ({args.frames} frames, alternating JPEG (quality 90) "
        f"photos: {', '.join(_photos())})",
        "",
        "decode = cv2.imdecode; detect = EyeRegionCropper.detect; crop = crop_at (levelled "
        "48x96 band); infer = normalise + int8 client (ORT, 1 thread); serialize = "
        "pack_activations + PREDICT envelope + safetensors encode. Peak RSS is the process's "
        "VmHWM (its ru_maxrss would include this benchmark's own peak, which fork+exec carries "
        "over); 'with torch' also imports torch and loads the float halves, as the agent does "
        "to train. Frames where no face was found are not timed; per row: "
        + ", ".join(str(r["no_face"]) for r in loops.values())
        + ".",
        "",
        "| detector | process | frames/s | "
        + " | ".join(f"{s} ms (share)" for s in STAGES)
        + " | peak RSS MB |",
        "|---|---|---:|" + "---:|" * len(STAGES) + "---:|",
    ]
    for (_detector, with_torch), r in loops.items():
        total = sum(r["ms"].values())
        cells = " | ".join(f"{r['ms'][s]:.2f} ({r['ms'][s] / total:.0%})" for s in STAGES)
        what = "with torch" if with_torch else "ORT only"
        lines.append(f"| {r['backend']} | {what} | {r['fps']:.0f} | {cells} | "
                     f"{r['maxrss_mb']:.0f} |")  # fmt: skip
    lines += [
        "",
        f"Same path with the fp32 ONNX client (MediaPipe, ORT only): {fp32_loop['fps']:.0f} "
        f"frames/s, infer {fp32_loop['ms']['infer']:.2f} ms.",
        "PREDICT message size per frame: "
        + ", ".join(f"{k} activations {v:,} bytes" for k, v in msg_sizes.items())
        + ".",
        "",
        "### Re-quantization on the device (export + calibrate on 128 crops + quantize + "
        "parity; one thread)",
        "",
        "| exporter | seconds | peak RSS before -> after MB |",
        "|---|---:|---|",
    ]
    for exporter, r in requant.items():
        lines.append(f"| {exporter} | {r['seconds']:.1f} | {r['rss_before_mb']:.0f} -> "
                     f"{r['maxrss_mb']:.0f} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint directory or model.safetensors; default: train one on the synthetic set",
    )
    ap.add_argument(
        "--train-rounds", type=int, default=8, help="rounds of that training (no --checkpoint)"
    )
    ap.add_argument("--out", type=Path, default=Path("bench_export.md"), help="markdown output")
    ap.add_argument("--runs", type=int, default=1000, help="timed runs per model")
    ap.add_argument("--frames", type=int, default=200, help="frames of the per-frame loop")
    ap.add_argument("--synth-identities", type=int, default=80, help="as in training")
    ap.add_argument("--frame-loop", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--requant-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--detector", default="mediapipe", help=argparse.SUPPRESS)
    ap.add_argument("--compression", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--with-torch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--exporter", default="torchscript", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.frame_loop:
        frame_loop(args)
        return
    if args.requant_child:
        requant_child(args)
        return
    if args.checkpoint is None:
        args.checkpoint = train_checkpoint(args.train_rounds, args.synth_identities)
    text = bench(args)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
