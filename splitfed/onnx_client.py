"""Client-half inference through ONNX Runtime: the device's live path.

Live mode runs the exported (usually int8) client half here; training keeps using the float torch
half. This module imports no torch, so an inference-only process stays small on a Raspberry Pi:
the normalisation constants travel in the model's own metadata (written by `sfl-export`).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitfed.errors import UserError

log = logging.getLogger(__name__)

# Keys of the ONNX metadata_props that `splitfed.quantize` writes into every model it produces.
META_FORMAT = "splitfed.format"
META_MODEL = "splitfed.model"  # ModelConfig as JSON
META_VERSION = "splitfed.model_version"
META_NORMALISATION = "splitfed.normalisation"  # {"mean": m, "std": s}: (x / 255 - m) / s
META_KIND = "splitfed.kind"  # "client" or "full"

EXPORT_HINT = "re-export it with `sfl-export --checkpoint CKPT --out DIR --int8`"

GraphOptimization = Literal["disable", "basic", "extended", "all"]


class InferenceConfig(BaseModel):
    """How the device runs the exported client half."""

    model_config = ConfigDict(extra="forbid")

    model: Path | None = Field(
        None, description="int8 (or fp32) ONNX client model; None = float torch half"
    )
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads")
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference",
    )
    provider_options: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="options per provider, e.g. TensorRT's engine cache: "
        "{TensorrtExecutionProvider: {trt_engine_cache_enable: 'True', ...}}",
    )
    graph_optimization: GraphOptimization = Field(
        "all", description="ONNX Runtime graph optimisation level"
    )
    full_model: Path | None = Field(
        None,
        description="client+server ONNX model (sfl-export --full-model) for fully offline "
        "inference; None = the aggregator classifies the smashed data",
    )
    requantize: bool = Field(
        True,
        description="when new client weights arrive, re-export and re-quantize the live model "
        "on the device, calibrated on its own crops (the aggregator holds no images)",
    )
    calibration_samples: int = Field(
        128, ge=8, le=4096, description="local crops used to calibrate the int8 model"
    )
    tta: bool = Field(
        False,
        description="with `full_model`: average the model's probabilities over nine placements "
        "of the eye band (`splitfed.data.tta`), nine forward passes a frame. Split inference "
        "cannot: each frame would cost nine uploads of smashed data",
    )

    @model_validator(mode="after")
    def _tta_needs_the_full_model(self) -> InferenceConfig:
        if self.tta and self.full_model is None:
            raise ValueError(
                "inference.tta needs inference.full_model (sfl-export --full-model): through "
                "the aggregator each frame would cost nine uploads of smashed data"
            )
        return self


def _session_options(config: InferenceConfig) -> Any:
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = config.threads
    # One frame at a time: a second pool would only add wake-ups.
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[config.graph_optimization]
    so.log_severity_level = 3  # errors only; ORT's warnings go to stderr, not to logging
    return so


def resolve_providers(config: InferenceConfig) -> list[tuple[str, dict[str, str]]]:
    """The configured providers that this onnxruntime build has, CPU always last.

    A Jetson config lists TensorRT and CUDA; on a build without them the model still runs, on
    the CPU, with a warning instead of a crash loop under systemd.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen: list[tuple[str, dict[str, str]]] = []
    for name in config.providers:
        if name in available:
            chosen.append((name, dict(config.provider_options.get(name, {}))))
        else:
            log.warning(
                "execution provider %s is not in this onnxruntime build (has: %s); skipping it",
                name,
                ", ".join(sorted(available)),
            )
    if not any(name == "CPUExecutionProvider" for name, _ in chosen):
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


def read_model_metadata(session: Any) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map or {})


class OnnxClient:
    """One ONNX Runtime session for the client half (or the full model), with shape checks.

    `expected_input` is the (C, H, W) the device's crop config produces; `expected_output` the
    smashed shape the aggregator expects (it encodes the cut layer). A mismatch is a UserError
    naming the file and the fix, raised when the model is loaded rather than on the first frame.
    """

    def __init__(
        self,
        path: Path | str,
        config: InferenceConfig | None = None,
        expected_input: tuple[int, int, int] | None = None,
        expected_output: tuple[int, ...] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.config = config or InferenceConfig()
        if not self.path.is_file():
            raise UserError(f"ONNX model {self.path} not found; {EXPORT_HINT}")
        providers = resolve_providers(self.config)
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                sess_options=_session_options(self.config),
                providers=[name for name, _ in providers],
                provider_options=[opts for _, opts in providers],
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types per failure
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{self.path}: not a usable ONNX model ({reason[:200]}); the file may be corrupt "
                f"or truncated: {EXPORT_HINT}"
            ) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(
                f"{self.path}: expected one input and one output, got {len(inputs)} and "
                f"{len(outputs)}; {EXPORT_HINT}"
            )
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape[1:])
        self.output_shape = tuple(outputs[0].shape[1:])
        if len(inputs[0].shape) != 4 or inputs[0].type != "tensor(float)":
            raise UserError(
                f"{self.path}: input is {inputs[0].type} {inputs[0].shape}, expected float32 "
                f"(batch, C, H, W); {EXPORT_HINT}"
            )
        if expected_input is not None and self.input_shape != tuple(expected_input):
            raise UserError(
                f"{self.path}: model input (C, H, W) is {self.input_shape} but the crop config "
                f"gives {tuple(expected_input)}; re-export for this crop size, or set crop: "
                f"height/width/grayscale to match the model"
            )
        if expected_output is not None and self.output_shape != tuple(expected_output):
            raise UserError(
                f"{self.path}: model output is {self.output_shape}, expected "
                f"{tuple(expected_output)} (another cut layer or width?); export the "
                f"checkpoint this run trains"
            )
        self.metadata = read_model_metadata(self.session)
        self.version = self.metadata.get(META_VERSION, "")
        self.providers = self.session.get_providers()
        norm = self.metadata.get(META_NORMALISATION)
        if norm:
            values = json.loads(norm)
            self.mean, self.std = float(values["mean"]), float(values["std"])
        else:
            from splitfed.data.batches import PIXEL_MEAN, PIXEL_STD  # imports torch; rare path

            self.mean, self.std = PIXEL_MEAN, PIXEL_STD
        # ORT sessions are thread-safe for run(), but the agent swaps models from a background
        # thread; callers hold a reference to one OnnxClient per frame, so no lock is needed here.
        log.debug(
            "ONNX model %s (version %s) on %s", self.path, self.version or "?", self.providers[0]
        )

    def normalise(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) crops -> the float32 input the model expects."""
        x = np.asarray(crops, dtype=np.float32) * np.float32(1.0 / 255.0)
        return (x - np.float32(self.mean)) / np.float32(self.std)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 (N, C, H, W) -> the model's output (smashed data or logits)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input {x.shape[1:]} does not fit the model's {self.input_shape}")
        return self.session.run(None, {self.input_name: x})[0]

    def run_crops(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) or (C, H, W) crops -> model output."""
        return self.run(self.normalise(crops))


class LiveModel:
    """The current OnnxClient, swapped atomically when a re-quantized model is ready.

    The frame loop calls `get()` per frame; a background re-quantization calls `swap()` when it
    is done. Replacing one reference is atomic in CPython, the lock only orders the swaps.
    """

    def __init__(self, client: OnnxClient | None = None) -> None:
        self._client = client
        self._lock = threading.Lock()

    def get(self) -> OnnxClient | None:
        return self._client

    def swap(self, client: OnnxClient) -> OnnxClient | None:
        with self._lock:
            old, self._client = self._client, client
        return old
