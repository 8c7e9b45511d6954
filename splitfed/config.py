"""Training configuration that the aggregator sends to every client in each round."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from splitfed.wire import Compression, GradCompression


def round_lr(cfg: TrainConfig, rnd: int, rounds: int) -> float:
    """The learning rate of round `rnd` of `rounds`; every model copy uses the same."""
    if cfg.schedule == "constant" or rounds <= 1:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * rnd / rounds))


class TrainConfig(BaseModel):
    """Optimisation settings; identical on every model copy so that splits change no arithmetic."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(32, ge=2, le=1024, description="mini-batch size on each client")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="learning rate over the rounds; cosine decays to zero at the last one"
    )
    optimizer: Literal["adam", "sgd"] = Field("adam", description="optimizer of every model copy")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay")
    local_epochs: int = Field(1, ge=1, le=100, description="passes over local data per round")
    compression: Compression = Field("fp32", description="activations on the wire")
    grad_compression: GradCompression = Field("fp32", description="gradients on the wire")
    augment: bool = Field(True, description="augment training batches on the device")
