"""The ONNX export used by `sfl-export`; the machinery lives in `splitfed.quantize`.

The edge agent re-quantizes new weights on the device with the same code, and an app may not
import another, so the exporter, the quantizer and the `Requantizer` live in the core. This
module keeps the names `sfl-export` and its users have always imported from here.
"""

from __future__ import annotations

from splitfed.quantize import (
    DEFAULT_OPSET,
    FILES,
    FORMAT,
    FP32_REL_TOLERANCE,
    FP32_TOLERANCE,
    INT8_MAX_DROP_POINTS,
    MANIFEST,
    Exporter,
    ParityError,
    QuantConfig,
    Requantizer,
    check_crops,
    client_from_state,
    export_client,
    export_onnx,
    quantize_int8,
    read_manifest,
    requantize,
    sha256_file,
    weights_digest,
)

__all__ = [
    "DEFAULT_OPSET",
    "FILES",
    "FORMAT",
    "FP32_REL_TOLERANCE",
    "FP32_TOLERANCE",
    "INT8_MAX_DROP_POINTS",
    "MANIFEST",
    "Exporter",
    "ParityError",
    "QuantConfig",
    "Requantizer",
    "check_crops",
    "client_from_state",
    "export_client",
    "export_onnx",
    "quantize_int8",
    "read_manifest",
    "requantize",
    "sha256_file",
    "weights_digest",
]
