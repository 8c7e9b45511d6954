"""ONNX export: manifest, fp32 parity with torch, int8 agreement, the CLI, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from export.cli import main
from export.onnx import (
    FILES,
    FP32_TOLERANCE,
    Requantizer,
    export_client,
    requantize,
    sha256_file,
)
from splitfed.data.batches import PIXEL_MEAN, PIXEL_STD, to_tensor
from splitfed.errors import UserError
from splitfed.model import smashed_shape
from splitfed.onnx_client import InferenceConfig, OnnxClient
from splitfed.training import make_optimizer, state_to_numpy
from tests.export.conftest import Exported, Trained, crops

# Measured on the fixture model (2 rounds on 140 synthetic crops): agreement 1.0 over all 140
# crops, accuracy drop 0 points. The bounds leave room for other CPUs' rounding.
MIN_AGREEMENT = 0.95
MAX_DROP_POINTS = 3.0


def _torch(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_manifest_describes_the_files(exported: Exported, trained: Trained) -> None:
    m = exported.manifest
    assert json.loads((exported.out / "manifest.json").read_text()) == m
    assert m["model_version"] == "test-v1"
    assert m["cut"] == trained.cfg.cut
    assert m["input"]["shape"] == ["batch", *trained.cfg.input_shape]
    assert m["input"]["normalisation"]["mean"] == PIXEL_MEAN
    assert m["input"]["normalisation"]["std"] == PIXEL_STD
    assert m["output"]["shape"] == ["batch", *smashed_shape(trained.cfg)]
    assert m["opset"] == 18
    assert set(m["files"]) == set(FILES)
    for entry in m["files"].values():
        path = exported.out / entry["path"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path)
        model = onnx.load(str(path))
        assert any(o.version == 18 for o in model.opset_import if o.domain in ("", "ai.onnx"))
    # int8 weights take about a quarter of the fp32 bytes (graph overhead aside).
    assert m["files"]["client_int8"]["bytes"] < 0.6 * m["files"]["client_fp32"]["bytes"]


def test_fp32_matches_torch_with_any_batch_size(exported: Exported, trained: Trained) -> None:
    assert exported.manifest["parity"]["fp32_max_abs_diff"] <= FP32_TOLERANCE
    x = to_tensor(crops(5, trained.cfg.input_shape)).numpy()  # batch 5: the axis is dynamic
    sess = ort.InferenceSession(str(exported.out / "client_fp32.onnx"))
    out = sess.run(None, {"input": x})[0]
    ref = _torch(trained.client, x)
    assert out.shape == ref.shape == (5, *smashed_shape(trained.cfg))
    assert np.abs(out - ref).max() <= FP32_TOLERANCE
    full = ort.InferenceSession(str(exported.out / "full_fp32.onnx")).run(None, {"input": x})[0]
    assert np.abs(full - _torch(trained.server, ref)).max() <= FP32_TOLERANCE


def test_int8_is_quantized_and_agrees(exported: Exported, trained: Trained) -> None:
    graph = onnx.load(str(exported.out / "client_int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}  # QDQ
    # The convolution on the one-channel input stays float (QuantConfig.float_first_conv), and
    # so does the per-crop standardisation before it: nothing is quantized before that conv.
    producer = {out: n for n in graph.node for out in n.output}
    first = next(n for n in graph.node if n.op_type == "Conv")
    assert all(producer[i].op_type != "DequantizeLinear" for i in first.input if i in producer)
    seen = set()
    for n in graph.node:  # the nodes between the input and the first conv
        if n is first:
            break
        if n.op_type != "DequantizeLinear":
            seen.add(n.op_type)
    assert "QuantizeLinear" not in seen, seen
    x = to_tensor(trained.data.images).numpy()
    ref = _torch(trained.server, _torch(trained.client, x)).argmax(1)
    assert len(np.unique(ref)) >= 2, "fixture model predicts one class: agreement means nothing"
    q = OnnxClient(exported.out / "client_int8.onnx").run(x)
    pred = _torch(trained.server, q).argmax(1)
    agreement = float(np.mean(pred == ref))
    assert agreement >= MIN_AGREEMENT
    p = exported.manifest["parity"]
    assert p["int8_top1_agreement"] == pytest.approx(agreement)
    assert p["int8_accuracy_drop_points"] <= MAX_DROP_POINTS
    assert p["full_int8_top1_agreement"] >= MIN_AGREEMENT
    assert p["int8_smashed_rel_rmse"] < 0.1


def test_onnx_client_reads_normalisation_from_the_model(
    exported: Exported, trained: Trained
) -> None:
    client = OnnxClient(
        exported.out / "client_fp32.onnx",
        expected_input=trained.cfg.input_shape,
        expected_output=smashed_shape(trained.cfg),
    )
    assert client.version == "test-v1"
    c = crops(3, trained.cfg.input_shape)
    np.testing.assert_allclose(
        client.run_crops(c), client.run(to_tensor(c).numpy()), rtol=0, atol=1e-5
    )
    with pytest.raises(ValueError, match="does not fit"):
        client.run(np.zeros((1, 1, 10, 10), np.float32))


def test_live_inference_imports_no_torch(exported: Exported, trained: Trained) -> None:
    code = (
        "import sys, numpy as np\n"
        "from splitfed.onnx_client import OnnxClient\n"
        f"c = OnnxClient({str(exported.out / 'client_int8.onnx')!r})\n"
        f"y = c.run_crops(np.zeros((1, *{tuple(trained.cfg.input_shape)}), np.uint8))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(y.shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str((1, *smashed_shape(trained.cfg)))


def test_unavailable_providers_fall_back_to_cpu(
    exported: Exported, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = InferenceConfig(providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    with caplog.at_level("WARNING"):
        client = OnnxClient(exported.out / "client_int8.onnx", cfg)
    assert client.providers == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not in this onnxruntime build" in caplog.text


# ---- bad input -----------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo[UserError]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_onnx_is_a_user_error(exported: Exported, tmp_path: Path, damage: str) -> None:
    good = (exported.out / "client_int8.onnx").read_bytes()
    bad = tmp_path / "client_int8.onnx"
    bad.write_bytes(
        {"garbage": b"not a model" * 100, "truncated": good[: len(good) // 2], "empty": b""}[damage]
    )
    with pytest.raises(UserError) as e:
        OnnxClient(bad)
    text = _one_line(e)
    assert str(bad) in text and "sfl-export" in text


def test_missing_onnx_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        OnnxClient(tmp_path / "nope.onnx")
    assert "not found" in _one_line(e) and "sfl-export" in str(e.value)


def test_model_that_does_not_fit_the_config(exported: Exported) -> None:
    path = exported.out / "client_int8.onnx"
    with pytest.raises(UserError) as e:
        OnnxClient(path, expected_input=(1, 64, 64))
    text = _one_line(e)
    assert str(path) in text and "(1, 64, 64)" in text and "crop" in text
    with pytest.raises(UserError) as e:
        OnnxClient(path, expected_input=(1, 48, 96), expected_output=(64, 6, 12))
    assert "cut layer" in _one_line(e)


def test_missing_face_model_is_a_user_error(tmp_path: Path) -> None:
    from splitfed.data.crop import CropConfig, EyeRegionCropper

    missing = tmp_path / "face.tflite"
    with pytest.raises(UserError) as e:
        EyeRegionCropper(CropConfig(face_model=missing))
    assert str(missing) in _one_line(e) and "fetch_face_model" in str(e.value)


def test_damaged_checkpoint_is_a_user_error(trained: Trained, tmp_path: Path) -> None:
    from splitfed.checkpoint import load_model

    data = (trained.checkpoint / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError) as e:
        load_model(bad)
    assert str(bad) in _one_line(e)
    with pytest.raises(UserError) as e:
        load_model(tmp_path / "missing")
    assert "no checkpoint" in _one_line(e)


# ---- the command -------------------------------------------------------------------------------


def test_cli_exports_int8(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main,
        ["--checkpoint", str(trained.checkpoint), "--out", str(out), "--int8",
         "--calibration", "synth", "--synth-identities", "10", "--calibration-samples", "64",
         "--exporter", "torchscript", "--cut", str(trained.cfg.cut)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["files"]) == {"client_fp32", "client_int8"}
    assert m["model_version"].startswith("centralized-r")
    assert m["quantization"]["calibration_samples"] == 64
    assert m["parity"]["fp32_max_abs_diff"] <= FP32_TOLERANCE and m["parity_ok"]
    assert m["parity"]["int8_sample_source"] == "eval data"
    assert m["source"]["algo"] == "centralized"


def test_cli_fails_a_broken_export(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import splitfed.quantize

    monkeypatch.setattr(splitfed.quantize, "FP32_TOLERANCE", 0.0)  # any rounding is now broken
    monkeypatch.setattr(splitfed.quantize, "FP32_REL_TOLERANCE", 0.0)
    args = ["--checkpoint", str(trained.checkpoint), "--out", str(tmp_path),
            "--exporter", "torchscript", "--synth-identities", "4"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert "parity check" in res.output and "client_fp32.onnx" in res.output
    assert json.loads((tmp_path / "manifest.json").read_text())["parity_ok"] is False


def _cli_error(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_cli_refuses_another_cut_layer(trained: Trained, tmp_path: Path) -> None:
    other = trained.cfg.cut + 1
    line = _cli_error(
        ["--checkpoint", str(trained.checkpoint), "--out", str(tmp_path), "--cut", str(other)]
    )
    assert str(trained.checkpoint) in line and f"cut layer {trained.cfg.cut}" in line
    # An existing export of another cut in --out is not silently replaced either.
    (tmp_path / "manifest.json").write_text(json.dumps({"cut": other}))
    line = _cli_error(["--checkpoint", str(trained.checkpoint), "--out", str(tmp_path)])
    assert "manifest.json" in line and f"--cut {trained.cfg.cut}" in line


def test_cli_bad_checkpoints(tmp_path: Path) -> None:
    line = _cli_error(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert "no checkpoint" in line
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    line = _cli_error(["--checkpoint", str(bad), "--out", str(tmp_path / "o")])
    assert str(bad) in line


# ---- on the device: re-quantization ----------------------------------------------------------


def test_requantize_from_weights(trained: Trained, tmp_path: Path) -> None:
    state = state_to_numpy(trained.client)
    paths, manifest = requantize(state, trained.cfg, trained.train.images[:32], tmp_path, "r7")
    assert manifest["model_version"] == "r7" and manifest["exporter"] == "torchscript"
    assert manifest["parity"]["fp32_max_abs_diff"] <= FP32_TOLERANCE
    assert OnnxClient(paths["client_int8"]).version == "r7"
    with pytest.raises(ValueError, match="uint8"):
        requantize(state, trained.cfg, trained.train.images[:4].astype(np.float32), tmp_path, "x")


@pytest.mark.filterwarnings("ignore:.*TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
def test_requantizer_runs_beside_training(trained: Trained, tmp_path: Path) -> None:
    """Weights submitted while training goes on are quantized as they were when submitted."""
    import copy

    from splitfed.config import TrainConfig

    client = copy.deepcopy(trained.client).train()
    ready: list[tuple[OnnxClient, dict]] = []
    done = threading.Event()

    def on_ready(c: OnnxClient, m: dict) -> None:
        ready.append((c, m))
        done.set()

    rq = Requantizer(trained.cfg, tmp_path, InferenceConfig(calibration_samples=32), on_ready)
    try:
        snapshots = {}
        opt = make_optimizer(client.parameters(), TrainConfig(lr=0.05))
        x = to_tensor(trained.train.images[:16])
        for version in ("r1", "r2"):
            snapshots[version] = state_to_numpy(client)
            rq.submit(snapshots[version], trained.train.images, version)
            for _ in range(3):  # training goes on in this thread meanwhile
                opt.zero_grad()
                client(x).pow(2).mean().backward()
                opt.step()
        assert rq.wait_idle(timeout=120)
    finally:
        rq.close()
    assert rq.last_error is None
    assert ready and ready[-1][1]["model_version"] == "r2"  # the newest request wins
    live = ready[-1][0]
    from export.onnx import client_from_state

    ref = _torch(client_from_state(trained.cfg, snapshots["r2"]), x.numpy())
    out = live.run(x.numpy())
    rel = np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    assert rel < 0.1
    assert len(list(tmp_path.glob("v-*"))) <= 2


def test_export_refuses_crops_of_another_shape(trained: Trained, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model takes"):
        export_client(trained.client, trained.cfg, tmp_path, calibration=crops(4, (1, 32, 32)))


def test_quantization_follows_the_device_provider() -> None:
    from export.onnx import QuantConfig

    trt = QuantConfig.for_providers(["TensorrtExecutionProvider", "CPUExecutionProvider"])
    assert (trt.format, trt.activation, trt.symmetric_activations) == ("qdq", "int8", True)
    cpu = QuantConfig.for_providers(["CPUExecutionProvider"])
    assert (cpu.format, cpu.activation, cpu.per_channel) == ("qdq", "uint8", True)


# ---- parity: accuracy only on people the model never trained on --------------------------------


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained by simulate on the 8-person synthetic set (subject split, seed 0)."""
    from splitfed.config import TrainConfig
    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.simulate import SimSpec, simulate

    out = tmp_path_factory.mktemp("synth_run")
    spec = SimSpec(algo="centralized", clients=1, rounds=1, out_dir=out,
                   train=TrainConfig(batch_size=16))  # fmt: skip
    simulate(generate_synth(SynthConfig(identities=8)), spec)
    return out / "checkpoint"


def _export_parity(checkpoint: Path, out: Path, *args: str) -> tuple[dict, str]:
    res = CliRunner().invoke(
        main,
        ["--checkpoint", str(checkpoint), "--out", str(out), "--int8", "--exporter",
         "torchscript", "--calibration-samples", "32", *args],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return json.loads((out / "manifest.json").read_text())["parity"], res.output


def test_parity_accuracy_on_the_training_runs_held_out_people(
    synth_run: Path, tmp_path: Path
) -> None:
    p, output = _export_parity(synth_run, tmp_path, "--synth-identities", "8")
    assert "never seen in training" in p["accuracy_on"]
    assert 0.0 <= p["fp32_accuracy"] <= 1.0 and "int8_accuracy_drop_points" in p
    assert "never seen in training" in " ".join(output.split())


def test_parity_is_agreement_only_when_the_split_differs(synth_run: Path, tmp_path: Path) -> None:
    """Other synthetic people counts give another split: unseen people cannot be proven."""
    p, output = _export_parity(synth_run, tmp_path, "--synth-identities", "10")
    assert "int8_top1_agreement" in p
    assert not {"fp32_accuracy", "int8_accuracy", "accuracy_on"} & set(p)
    assert "no accuracy" in output


def test_parity_is_agreement_only_without_subject_ids(synth_run: Path, tmp_path: Path) -> None:
    import cv2

    rng = np.random.default_rng(3)
    for emotion in ("happy", "sad", "neutral"):
        (tmp_path / "crops" / emotion).mkdir(parents=True)
        for i in range(12):
            face = rng.integers(0, 256, (48, 96), dtype=np.uint8)
            assert cv2.imwrite(str(tmp_path / "crops" / emotion / f"{i}.png"), face)
    p, _ = _export_parity(synth_run, tmp_path / "out", "--calibration", str(tmp_path / "crops"))
    assert "int8_top1_agreement" in p and p["int8_samples"] > 0
    assert "fp32_accuracy" not in p and "accuracy_on" not in p


def test_parity_on_another_data_set_with_subject_ids_is_named(
    synth_run: Path, tmp_path: Path, folder_of_people: Path
) -> None:
    p, _ = _export_parity(synth_run, tmp_path / "out", "--calibration", str(folder_of_people))
    assert p["accuracy_on"].startswith("people of folder:people")
    assert "not the data set the model was trained on" in p["accuracy_on"]


@pytest.fixture
def folder_of_people(tmp_path: Path) -> Path:
    """Ready eye crops of 6 people in class folders, with subjects.csv."""
    import cv2

    root = tmp_path / "people"
    rng = np.random.default_rng(5)
    lines = ["file,subject"]
    for emotion in ("happy", "angry"):
        (root / emotion).mkdir(parents=True)
        for person in range(6):
            rel = f"{emotion}/p{person}.png"
            assert cv2.imwrite(str(root / rel), rng.integers(0, 256, (48, 96), dtype=np.uint8))
            lines.append(f"{rel},p{person}")
    (root / "subjects.csv").write_text("\n".join(lines) + "\n")
    return root
