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


class JitterConfig(BaseModel):
    """Geometric jitter of training crops, as wide as face detectors disagree on the band.

    Another detector places the band a little higher or lower, tighter or looser, and less
    level; training on such crops keeps the model from relying on one detector's geometry.
    All zero turns it off (the plain flips and pixel shifts of `augment` remain).
    """

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(0.0, ge=0, le=0.5, description="zoom drawn from 1 +- scale")
    rotation: float = Field(0.0, ge=0, le=45, description="roll drawn from +- degrees")
    shift_y: float = Field(0.0, ge=0, le=0.5, description="band offset, +- fraction of height")

    @property
    def enabled(self) -> bool:
        return self.scale > 0 or self.rotation > 0 or self.shift_y > 0


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
    sflv2_order: Literal["interleaved", "sequential"] = Field(
        "interleaved",
        description="SFLV2's server schedule: all clients' batches shuffled together, or the "
        "clients one after another in a random order (the SplitFed paper's description)",
    )
    jitter: JitterConfig = Field(
        default_factory=JitterConfig, description="geometric jitter when augmenting"
    )


class AggregationConfig(BaseModel):
    """How the aggregator combines the copies of a model half that devices send back.

    `mean` is FedAvg's sample-weighted mean. `median` and `trimmed-mean` work per coordinate and
    ignore the sample weights, so one device cannot pull the result far however it scales its
    update; clipping bounds each update's distance from the current global half first.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["mean", "trimmed-mean", "median"] = Field(
        "mean", description="rule that combines the devices' copies of a half"
    )
    trim_ratio: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed-mean: share of copies cut at each end per value"
    )
    clip_update_norm: float | None = Field(
        None, gt=0, description="clip each update (copy minus global half) to this L2 norm"
    )
    server_opt: Literal["none", "momentum", "adam"] = Field(
        "none",
        description="server optimizer on the aggregate: none (FedAvg), momentum (FedAvgM), "
        "adam (FedAdam); splitfed.algorithms.server_opt",
    )
    server_lr: float | None = Field(
        None, gt=0, description="server learning rate [1.0 for momentum, 0.01 for adam]"
    )
    server_momentum: float = Field(
        0.9, ge=0, lt=1, description="momentum (FedAvgM) or Adam's beta1 (FedAdam)"
    )

    @property
    def effective_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 0.01 if self.server_opt == "adam" else 1.0
