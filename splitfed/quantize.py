"""ONNX export of the client half (fp32) and calibrated int8 quantization, with parity checks.

In the core because two programs need it and an app may not import another: `sfl-export` on
the aggregator host (from a checkpoint, calibrated on a data set, with accuracy parity through
the server half) and the edge agent, which re-quantizes every new global client half with its
own crops as calibration data: the aggregator holds no images, so only the device can calibrate
on what its camera sees (`requantize`, `Requantizer`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.data.batches import PIXEL_MEAN, PIXEL_STD, to_tensor
from splitfed.data.dataset import EmotionDataset
from splitfed.model import ClientNet, ModelConfig, ServerNet, build_split_model, smashed_shape
from splitfed.onnx_client import (
    META_FORMAT,
    META_KIND,
    META_MODEL,
    META_NORMALISATION,
    META_VERSION,
    InferenceConfig,
    OnnxClient,
)
from splitfed.training import load_numpy_state

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "splitfed-onnx/1"
DEFAULT_OPSET = 18  # the dynamo exporter's own opset; lower ones go through version conversion
FP32_TOLERANCE = 1e-4  # max |onnx - torch| on sample crops, checked at every export
# ... except that float32 itself cannot hold 1e-4 once activations grow: a few ulps of 400 are
# 1e-4, and the per-crop normalisation (a mean and a variance over 4,608 pixels, summed in
# another order by ONNX Runtime) moves a trained half's output by about 1.4e-5 of its largest
# value. So 1e-4 of the largest output applies when it is the larger; a broken export
# (BatchNorm folded wrong, a layer missing) is off by a large fraction of the output.
FP32_REL_TOLERANCE = 1e-4
INT8_MAX_DROP_POINTS = 1.0  # target: int8 loses at most one accuracy point through the server
FILES = {
    "client_fp32": "client_fp32.onnx",
    "client_int8": "client_int8.onnx",
    "full_fp32": "full_fp32.onnx",
    "full_int8": "full_int8.onnx",
}

Exporter = Literal["dynamo", "torchscript"]

# The exporters are chatty about things that do not concern this model (torchvision ops, the
# TorchScript exporter's deprecation, pytree internals).
_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    (".*legacy TorchScript-based ONNX export", DeprecationWarning, ""),
    ("The feature will be removed", DeprecationWarning, r"torch\.onnx"),
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning, ""),
)
for _message, _category, _module in _NOISE:
    warnings.filterwarnings("ignore", message=_message, category=_category, module=_module)
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
logging.getLogger("torch.onnx._internal.exporter._compat").setLevel(logging.ERROR)
for _name in ("onnx_ir", "onnxscript", "onnxruntime.quantization"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class ParityError(RuntimeError):
    """The exported fp32 model disagrees with torch beyond tolerance: a broken export."""


class QuantConfig(BaseModel):
    """ONNX Runtime static quantization settings; recorded in the manifest."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["qdq", "qoperator"] = Field(
        "qdq",
        description="QDQ runs on every provider (TensorRT needs it); the CPU provider fuses it "
        "into QLinearConv anyway",
    )
    per_channel: bool = Field(True, description="one weight scale per output channel")
    activation: Literal["uint8", "int8"] = Field(
        "uint8", description="activation type: uint8 (CPU, U8S8) or int8 (TensorRT)"
    )
    symmetric_activations: bool = Field(False, description="zero point 0 (TensorRT needs it)")
    reduce_range: bool = Field(
        False, description="7-bit weights, for CPUs without VNNI that could saturate"
    )
    float_first_conv: bool = Field(
        True,
        description="keep the convolution on the input in float: with one input channel it is "
        "cheap in fp32, slow in int8, and the most sensitive layer to quantize",
    )
    method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="calibration method"
    )
    batch_size: int = Field(16, ge=1, description="calibration batch size")

    @classmethod
    def for_providers(cls, providers: Sequence[str]) -> QuantConfig:
        """What the device's first accelerator wants: TensorRT takes symmetric int8 QDQ."""
        if providers and providers[0] == "TensorrtExecutionProvider":
            return cls(activation="int8", symmetric_activations=True)
        return cls()


# ---- helpers -----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """Short content hash of a module's weights: a model version when none is given."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().cpu().numpy()).tobytes())
    return h.hexdigest()[:12]


class _FullNet(nn.Module):
    """Client and server halves as one network, for fully offline inference on the device."""

    def __init__(self, client: ClientNet, server: ServerNet) -> None:
        super().__init__()
        self.client = client
        self.server = server

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.server(self.client(x))


def _eval_copy(module: nn.Module) -> nn.Module:
    """A frozen eval-mode copy: export folds BatchNorm into the convolutions and drops dropout,
    and a copy leaves the caller's module (maybe in training) untouched."""
    m = copy.deepcopy(module).cpu().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def export_onnx(
    module: nn.Module,
    input_shape: tuple[int, ...],
    path: Path,
    output_name: str,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "dynamo",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Export `module` (eval copy) to `path` with a dynamic batch axis and splitfed metadata."""
    import onnx

    m = _eval_copy(module)
    example = (torch.zeros(2, *input_shape),)
    tmp = path.with_name(path.name + ".tmp")
    with _quiet_warnings():
        if exporter == "dynamo":
            torch.onnx.export(
                m, example, str(tmp), dynamo=True, external_data=False, optimize=True,
                input_names=["input"], output_names=[output_name], opset_version=opset,
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False,
            )  # fmt: skip
        else:
            torch.onnx.export(
                m, example, str(tmp), dynamo=False, input_names=["input"],
                output_names=[output_name], opset_version=opset, do_constant_folding=True,
                dynamic_axes={"input": {0: "batch"}, output_name: {0: "batch"}},
            )  # fmt: skip
    model = onnx.load(str(tmp))
    _set_metadata(model, metadata or {})
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    tmp.replace(path)


def _input_convs(model: Any) -> list[str]:
    """Names of the first Conv nodes on the input and of every node before them.

    The first convolution reads the input directly, or through the parameter-free per-crop
    normalisation (ReduceMean, Sub, Pow, Sqrt, Div): those nodes stay in float with it, since
    their output is a standardised crop whose range a calibration on raw pixels cannot fix.
    """
    reached = {i.name for i in model.graph.input}
    names: list[str] = []
    for n in model.graph.node:  # ONNX keeps nodes in topological order
        if not any(i in reached for i in n.input):
            continue
        names.append(n.name)
        if n.op_type != "Conv":
            reached.update(n.output)
    return names


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Re-apply the noise filters for one export, from the main thread only.

    The filters are also installed at import, which covers background threads (the agent's
    re-quantization); catch_warnings() is not thread-safe, so it is used on the main thread
    only, where something (pytest, -W flags) may have reset the filters since import.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        for message, category, module in _NOISE:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


def _set_metadata(model: Any, metadata: Mapping[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    model.producer_name = "splitfed-edge"


class _Calibration:
    """CalibrationDataReader over normalised crops, in batches."""

    def __init__(self, x: np.ndarray, batch_size: int) -> None:
        self.batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {"input": self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    quant: QuantConfig | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Static int8 quantization of `fp32_path`, calibrated on uint8 (N, C, H, W) crops."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    q = quant or QuantConfig()
    x = to_tensor(calibration).numpy()
    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(x, q.batch_size)
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory(prefix="sfl-quant-") as tmp_dir:
        pre = Path(tmp_dir) / "pre.onnx"
        # Shape inference and ORT's basic fusions first, as ORT's quantization guide asks.
        quant_pre_process(str(fp32_path), str(pre))
        exclude = _input_convs(onnx.load(str(pre))) if q.float_first_conv else []
        tmp = out_path.with_name(out_path.name + ".tmp")
        quantize_static(
            str(pre),
            str(tmp),
            reader,
            quant_format=QuantFormat.QDQ if q.format == "qdq" else QuantFormat.QOperator,
            per_channel=q.per_channel,
            reduce_range=q.reduce_range,
            activation_type=QuantType.QUInt8 if q.activation == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[q.method],
            nodes_to_exclude=exclude,
            extra_options={
                "ActivationSymmetric": q.symmetric_activations,
                "WeightSymmetric": True,
            },
        )
    model = onnx.load(str(tmp))
    _set_metadata(model, metadata or {})
    onnx.save(model, str(tmp))
    tmp.replace(out_path)


def _session(path: Path) -> OnnxClient:
    return OnnxClient(path, InferenceConfig(threads=max(1, min(4, os.cpu_count() or 1))))


def _torch_out(module: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    m = _eval_copy(module)
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(m(torch.from_numpy(x[i : i + batch])).numpy())
    return np.concatenate(outs)


def _ort_out(client: OnnxClient, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([client.run(x[i : i + batch]) for i in range(0, len(x), batch)])


def _file_entry(path: Path) -> dict[str, Any]:
    return {"path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _sample_crops(
    model_cfg: ModelConfig,
    n: int,
    calibration: np.ndarray | None,
    eval_data: EmotionDataset | None,
) -> tuple[np.ndarray, str]:
    """Crops for the fp32 parity check: held-out data, else calibration crops, else noise."""
    if eval_data is not None and len(eval_data):
        return eval_data.images[:n], "eval data"
    if calibration is not None and len(calibration):
        return calibration[:n], "calibration crops"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *model_cfg.input_shape), dtype=np.uint8), "random pixels"


def check_crops(crops: np.ndarray, model_cfg: ModelConfig, what: str) -> np.ndarray:
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 4:
        raise ValueError(f"{what} must be uint8 (N, C, H, W), got {crops.dtype} {crops.shape}")
    if tuple(crops.shape[1:]) != tuple(model_cfg.input_shape):
        raise ValueError(
            f"{what} are {tuple(crops.shape[1:])}, the model takes {tuple(model_cfg.input_shape)}"
        )
    if len(crops) == 0:
        raise ValueError(f"{what}: no crops")
    return crops


# ---- the export --------------------------------------------------------------------------------


def export_client(
    client_net: ClientNet,
    model_cfg: ModelConfig,
    out_dir: Path,
    calibration: np.ndarray | None = None,
    opset: int = DEFAULT_OPSET,
    server_net: ServerNet | None = None,
    full_model: bool = False,
    eval_data: EmotionDataset | None = None,
    version: str | None = None,
    quant: QuantConfig | None = None,
    exporter: Exporter = "dynamo",
    parity_samples: int = 64,
    source: Mapping[str, Any] | None = None,
    accuracy_on: str | None = "eval data",
) -> dict[str, Any]:
    """Export the client half (and with `full_model` client+server) and write the manifest.

    `calibration` (uint8 crops) turns on int8; `server_net` gives top-1 agreement and, with
    labelled `eval_data`, the test-accuracy drop of int8, recorded as measured on `accuracy_on`
    (who the eval data are); with `accuracy_on=None` (the model may have trained on these
    people) only agreement is reported. Raises ParityError when the fp32 model
    (client or full) is off by more than max(FP32_TOLERANCE, FP32_REL_TOLERANCE * max |output|);
    int8 targets are recorded (and logged), not enforced.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if full_model and server_net is None:
        raise ValueError("full_model needs server_net")
    if calibration is not None:
        calibration = check_crops(calibration, model_cfg, "calibration crops")
    if eval_data is not None:
        check_crops(eval_data.images, model_cfg, "eval crops")
    quant = quant or QuantConfig()
    version = version or weights_digest(client_net)
    in_shape = tuple(model_cfg.input_shape)
    out_shape = smashed_shape(model_cfg)
    meta = {
        META_FORMAT: FORMAT,
        META_MODEL: model_cfg.model_dump_json(),
        META_VERSION: version,
        META_NORMALISATION: json.dumps({"mean": PIXEL_MEAN, "std": PIXEL_STD}),
    }
    paths = {k: out_dir / v for k, v in FILES.items()}

    export_onnx(client_net, in_shape, paths["client_fp32"], "smashed", opset, exporter,
                {**meta, META_KIND: "client"})  # fmt: skip
    if full_model:
        assert server_net is not None
        full = _FullNet(client_net, server_net)
        export_onnx(full, in_shape, paths["full_fp32"], "logits", opset, exporter,
                    {**meta, META_KIND: "full"})  # fmt: skip
    if calibration is not None:
        quantize_int8(paths["client_fp32"], paths["client_int8"], calibration, quant,
                      {**meta, META_KIND: "client"})  # fmt: skip
        if full_model:
            quantize_int8(paths["full_fp32"], paths["full_int8"], calibration, quant,
                          {**meta, META_KIND: "full"})  # fmt: skip
    # Remove files an earlier export in this directory left and this one did not write.
    written = {"client_fp32"} | ({"full_fp32"} if full_model else set())
    if calibration is not None:
        written |= {"client_int8"} | ({"full_int8"} if full_model else set())
    for key, path in paths.items():
        if key not in written and path.exists():
            path.unlink()

    parity = _parity(
        paths, written, client_net, server_net, model_cfg, calibration, eval_data, parity_samples,
        accuracy_on,
    )  # fmt: skip
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model_version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": dict(source or {}),
        "cut": model_cfg.cut,
        "model": model_cfg.model_dump(mode="json"),
        "input": {
            "name": "input",
            "shape": ["batch", *in_shape],
            "dtype": "float32",
            "layout": "NCHW",
            "normalisation": {
                "formula": "(pixel / 255 - mean) / std",
                "mean": PIXEL_MEAN,
                "std": PIXEL_STD,
            },
        },
        "output": {"name": "smashed", "shape": ["batch", *out_shape], "dtype": "float32"},
        "opset": _opset_of(paths["client_fp32"]),
        "exporter": exporter,
        "versions": _versions(),
        "quantization": (
            {**quant.model_dump(), "calibration_samples": int(len(calibration))}
            if calibration is not None
            else None
        ),
        "files": {k: _file_entry(paths[k]) for k in FILES if k in written},
        "parity": parity,
        "parity_ok": all(
            parity[f"{k}_max_abs_diff"] <= parity[f"{k}_tolerance_applied"]
            for k in ("fp32", "full_fp32")
            if f"{k}_max_abs_diff" in parity
        ),
        "export_seconds": round(time.perf_counter() - t0, 2),
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out_dir / MANIFEST)
    for kind in ("fp32", "full_fp32"):
        diff, limit = parity.get(f"{kind}_max_abs_diff"), parity.get(f"{kind}_tolerance_applied")
        if diff is not None and diff > limit:
            raise ParityError(
                f"{paths['client_fp32' if kind == 'fp32' else 'full_fp32']}: ONNX fp32 differs "
                f"from torch by {diff:.2e} > {limit:.1e}"
            )
    drop = parity.get("int8_accuracy_drop_points")
    if drop is not None and drop > INT8_MAX_DROP_POINTS:
        log.warning("int8 loses %.2f accuracy points (target <= %.1f); see %s",
                    drop, INT8_MAX_DROP_POINTS, out_dir / MANIFEST)  # fmt: skip
    return manifest


def _opset_of(path: Path) -> int:
    """The default-domain opset the file really has (conversion below 18 may keep 18)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _parity(
    paths: Mapping[str, Path],
    written: set[str],
    client_net: ClientNet,
    server_net: ServerNet | None,
    model_cfg: ModelConfig,
    calibration: np.ndarray | None,
    eval_data: EmotionDataset | None,
    n: int,
    accuracy_on: str | None = "eval data",
) -> dict[str, Any]:
    crops, origin = _sample_crops(model_cfg, n, calibration, eval_data)
    x = to_tensor(crops).numpy()
    ref = _torch_out(client_net, x)
    fp32 = _ort_out(_session(paths["client_fp32"]), x)
    out: dict[str, Any] = {
        "fp32_samples": len(x),
        "fp32_sample_source": origin,
        **_fp32_parity("fp32", fp32, ref),
    }
    if "full_fp32" in written:
        assert server_net is not None
        full_ref = _torch_out(_FullNet(client_net, server_net), x)
        full = _ort_out(_session(paths["full_fp32"]), x)
        out.update(_fp32_parity("full_fp32", full, full_ref))
    if "client_int8" not in written:
        return out
    # int8: judged on held-out data when there is some, so calibration cannot flatter it.
    if eval_data is not None and len(eval_data):
        xe, labels, source = to_tensor(eval_data.images).numpy(), eval_data.labels, "eval data"
        if accuracy_on is None:
            labels = None  # these people may be in training: accuracy would flatter the model
    else:
        xe, labels, source = x, None, origin
    ref_e = _torch_out(client_net, xe)
    q = _ort_out(_session(paths["client_int8"]), xe)
    rms = float(np.sqrt(np.mean(ref_e.astype(np.float64) ** 2)))
    out.update(
        {
            "int8_samples": len(xe),
            "int8_sample_source": source,
            "int8_smashed_max_abs_diff": float(np.abs(q - ref_e).max()),
            # error relative to the signal: the figure that says whether int8 is usable at all
            "int8_smashed_rel_rmse": float(np.sqrt(np.mean((q - ref_e) ** 2.0)) / max(rms, 1e-12)),
        }
    )
    if server_net is None:
        return out
    pred_ref = _torch_out(server_net, ref_e).argmax(1)
    pred_q = _torch_out(server_net, q).argmax(1)
    out["int8_top1_agreement"] = float(np.mean(pred_ref == pred_q))
    if labels is not None:
        acc_ref = float(np.mean(pred_ref == labels))
        acc_q = float(np.mean(pred_q == labels))
        out.update(
            {
                "accuracy_on": accuracy_on,
                "fp32_accuracy": acc_ref,
                "int8_accuracy": acc_q,
                "int8_accuracy_drop_points": round(100.0 * (acc_ref - acc_q), 4),
                "int8_accuracy_drop_target_points": INT8_MAX_DROP_POINTS,
            }
        )
    if "full_int8" in written:
        full_q = _ort_out(_session(paths["full_int8"]), xe).argmax(1)
        out["full_int8_top1_agreement"] = float(np.mean(full_q == pred_ref))
        if labels is not None:
            out["full_int8_accuracy"] = float(np.mean(full_q == labels))
    return out


def _fp32_parity(kind: str, out: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    diff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    return {
        f"{kind}_max_abs_diff": diff,
        f"{kind}_max_abs_output": scale,
        f"{kind}_tolerance": FP32_TOLERANCE,
        f"{kind}_tolerance_applied": max(FP32_TOLERANCE, FP32_REL_TOLERANCE * scale),
        f"{kind}_within_tolerance": diff <= FP32_TOLERANCE,
    }


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


# ---- on the device -----------------------------------------------------------------------------


def client_from_state(model_cfg: ModelConfig, state: Mapping[str, np.ndarray]) -> ClientNet:
    client, _ = build_split_model(model_cfg, 0)
    load_numpy_state(client, state)
    return client


def requantize(
    client: ClientNet | Mapping[str, np.ndarray],
    model_cfg: ModelConfig,
    crops: np.ndarray,
    out_dir: Path,
    version: str,
    quant: QuantConfig | None = None,
    exporter: Exporter | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Export + int8-quantize a client half on the device, calibrated on its own crops.

    `client` is a ClientNet or a weights dict (a snapshot: pass a copy if training goes on while
    this runs in another thread). Returns ({"client_fp32": path, "client_int8": path}, manifest).
    The TorchScript exporter is the default here: on this CPU it took 0.85 s and +35 MB RSS
    against 13 s and +157 MB for dynamo, which matters on a 1-4 GB Raspberry Pi.
    """
    crops = check_crops(crops, model_cfg, "calibration crops")
    net = client if isinstance(client, nn.Module) else client_from_state(model_cfg, client)
    kinds: list[Exporter] = [exporter] if exporter else ["torchscript", "dynamo"]
    for i, kind in enumerate(kinds):
        try:
            manifest = export_client(
                net, model_cfg, out_dir, calibration=crops, version=version, quant=quant,
                exporter=kind, parity_samples=min(64, len(crops)),
                source={"origin": "device re-quantization"},
            )  # fmt: skip
            break
        except ParityError:
            raise
        except Exception:
            if i == len(kinds) - 1:
                raise
            log.warning("%s export failed; trying %s", kind, kinds[i + 1], exc_info=True)
    return {k: Path(out_dir) / FILES[k] for k in ("client_fp32", "client_int8")}, manifest


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class Requantizer:
    """Re-quantizes new client weights in one background thread; the newest request wins.

    The agent calls `submit()` from its message loop whenever new global client weights arrive;
    `on_ready(OnnxClient, manifest)` runs in the worker thread when the int8 model is exported,
    checked and loaded (swap it into the frame loop there, e.g. with LiveModel.swap). A failed
    re-quantization is logged and the previous model stays live. Each version is written to its
    own directory under `root`; the newest `keep` are kept.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        root: Path,
        inference: InferenceConfig,
        on_ready: Callable[[OnnxClient, dict[str, Any]], None],
        keep: int = 2,
        nice: int = 10,
    ) -> None:
        self.model_cfg = model_cfg
        self.root = Path(root)
        self.inference = inference
        self.on_ready = on_ready
        self.keep = max(1, keep)
        self.nice = nice
        self.quant = QuantConfig.for_providers(inference.providers)
        self._cond = threading.Condition()
        self._pending: tuple[dict[str, np.ndarray], np.ndarray, str] | None = None
        self._busy = False
        self._closed = False
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="requantize", daemon=True)
        self._thread.start()

    def submit(self, state: Mapping[str, np.ndarray], crops: np.ndarray, version: str) -> None:
        """Queue new weights (copied now, so training may go on) with calibration crops."""
        n = self.inference.calibration_samples
        if len(crops) > n:
            idx = np.random.default_rng(len(crops)).choice(len(crops), n, replace=False)
            crops = crops[np.sort(idx)]
        snapshot = {k: np.array(v, copy=True) for k, v in state.items()}
        with self._cond:
            self._pending = (snapshot, np.array(crops, copy=True), version)
            self._cond.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is pending or running (for tests and clean shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 60.0) -> None:
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        with contextlib.suppress(OSError):  # lower this thread's priority only (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._run(*job)
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - keep the old model, keep the agent alive
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("re-quantizing version %s failed, keeping the live model: %s",
                          job[2], self.last_error)  # fmt: skip
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _run(self, state: dict[str, np.ndarray], crops: np.ndarray, version: str) -> None:
        t0 = time.perf_counter()
        out_dir = self.root / ("v-" + _SAFE.sub("_", version))
        paths, manifest = requantize(state, self.model_cfg, crops, out_dir, version, self.quant)
        client = OnnxClient(
            paths["client_int8"],
            self.inference,
            expected_input=tuple(self.model_cfg.input_shape),
            expected_output=smashed_shape(self.model_cfg),
        )
        log.info("int8 client version %s ready in %.1f s (rel. error %.3f)", version,
                 time.perf_counter() - t0, manifest["parity"]["int8_smashed_rel_rmse"])  # fmt: skip
        self.on_ready(client, manifest)
        self._prune(out_dir)

    def _prune(self, current: Path) -> None:
        dirs = [d for d in self.root.glob("v-*") if d.is_dir() and d != current]
        dirs.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        for d in dirs[self.keep - 1 :]:
            shutil.rmtree(d, ignore_errors=True)
