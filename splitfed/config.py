"""Training configuration that the aggregator sends to every client in each round."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from splitfed.wire import Compression, GradCompression


class TrainConfig(BaseModel):
    """Optimisation settings; identical on every model copy so that splits change no arithmetic."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(32, ge=2, le=1024, description="mini-batch size on each client")
    lr: float = Field(2e-3, gt=0, description="learning rate")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="optimizer of every model copy")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay")
    local_epochs: int = Field(1, ge=1, le=100, description="passes over local data per round")
    compression: Compression = Field("fp32", description="activations on the wire")
    grad_compression: GradCompression = Field("fp32", description="gradients on the wire")
    augment: bool = Field(True, description="augment training batches on the device")
