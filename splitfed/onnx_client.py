"""Client-half inference through ONNX Runtime (the device's live path).

(Initial interface; the export work fills in the implementation.)
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class InferenceConfig(BaseModel):
    """How the device runs the exported client half."""

    model_config = ConfigDict(extra="forbid")

    model: Path | None = Field(None, description="int8 (or fp32) ONNX client model; None = float torch half")
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads")
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference",
    )
