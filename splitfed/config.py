"""Training configuration that the aggregator sends to every client in each round."""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitfed.wire import Compression, GradCompression


def round_lr(cfg: TrainConfig, rnd: int, rounds: int) -> float:
    """The learning rate of round `rnd` of `rounds`; every model copy uses the same.

    The first `warmup_rounds` rounds climb linearly towards the peak (round r of w at
    lr * (r + 1) / (w + 1)); the schedule then runs over the rounds that remain."""
    w = min(cfg.warmup_rounds, max(rounds - 1, 0))
    if rnd < w:
        return cfg.lr * (rnd + 1) / (w + 1)
    if cfg.schedule == "constant" or rounds - w <= 1:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (rnd - w) / (rounds - w)))


class CameraConfig(BaseModel):
    """Photometric augmentation of training crops, as cameras and light differ.

    Another camera has another tone curve, light from another side, softer focus, fewer pixels,
    more sensor noise and stronger JPEG compression. Each change is applied to a crop with
    probability `p`, at a size drawn uniformly up to its maximum. `p` 0 turns it off; it is on
    by default, as part of the input recipe measured in BENCHMARKS.md ("Input recipe").
    """

    model_config = ConfigDict(extra="forbid")

    p: float = Field(
        0.5,
        ge=0,
        le=1,
        description="chance that each change is applied to a crop; 0 turns it off [0.5: with "
        "the per-crop input norm it lifted the domain-shift proxy by 5-9 points in centralized, "
        "SFLV1 and SFLV2 runs (BENCHMARKS.md)]",
    )
    gamma: float = Field(0.7, ge=0, le=2, description="tone curve: gamma 2**(+-gamma)")
    gradient: float = Field(
        80.0, ge=0, le=255, description="light from one side: up to this many grey levels"
    )
    blur: float = Field(1.4, ge=0, le=5, description="defocus: Gaussian std up to this, pixels")
    lowres: float = Field(3.0, ge=1, le=8, description="resolution divided by up to this factor")
    noise: float = Field(16.0, ge=0, le=64, description="sensor noise std up to this, grey levels")
    jpeg: int = Field(20, ge=1, le=95, description="JPEG quality drawn from this to 95")

    @property
    def enabled(self) -> bool:
        return self.p > 0


class JitterConfig(BaseModel):
    """Jitter of training crops, as wide as face detectors and cameras disagree.

    Another detector places the band a little higher or lower, tighter or looser, and less
    level; another camera renders it differently (`camera`). Training on such crops keeps the
    model from relying on one detector's geometry and one camera's look. The geometric jitter
    is off by default (all zero): without warm-up it left short trainings stuck near chance, and
    with it neither the full jitter nor zoom alone (`scale` 0.2, `--zoom-jitter`) raised the
    domain-shift proxy's accuracy over 10 to 15 paired folds at 20 epochs (BENCHMARKS.md). At
    160 epochs, with the camera on every crop and anti-aliasing, the full jitter (0.2, 5°, 0.1)
    raised it by 6 points for 2 in domain, on one seed, centralized ("The shift levers at 80
    epochs"): a recipe for cameras unlike the training photos, not the default. The camera is on
    (`camera.p` 0.5): with ModelConfig.input_norm="per-crop", also the default, it raised the
    domain-shift proxy's accuracy, and in-domain accuracy too from scratch; from pretrained
    weights it cost in-domain accuracy (BENCHMARKS.md, "Cross-validated matrix"). `camera.p` 0
    turns it off; the plain flips, pixel shifts and brightness changes of `augment` remain
    either way.
    """

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(0.0, ge=0, le=0.5, description="zoom drawn from 1 +- scale")
    rotation: float = Field(0.0, ge=0, le=45, description="roll drawn from +- degrees")
    shift_y: float = Field(0.0, ge=0, le=0.5, description="band offset, +- fraction of height")
    camera: CameraConfig = Field(
        default_factory=CameraConfig, description="photometric jitter: another camera's look"
    )

    @property
    def geometric(self) -> bool:
        return self.scale > 0 or self.rotation > 0 or self.shift_y > 0

    @property
    def enabled(self) -> bool:
        return self.geometric or self.camera.enabled


# Rounds a run trains when nobody says: on 840 synthetic pictures (batch 16) centralized scored 5
# points more at 80 than at 40, and 160 added nothing (BENCHMARKS.md, "Twice the epochs").
DEFAULT_ROUNDS = 80

Sflv2Order = Literal["interleaved", "sequential", "lockstep"]
SFLV2_ORDERS: tuple[str, ...] = get_args(Sflv2Order)


class TrainConfig(BaseModel):
    """Optimisation settings; identical on every model copy so that splits change no arithmetic."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(
        32,
        ge=2,
        le=1024,
        description="pictures a step trains on: each device's batch, or with `split_batch` the "
        "batch that SFLV1's, SFLV2's and FedAvg's devices share",
    )
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="learning rate over the rounds; cosine decays to zero at the last one"
    )
    warmup_rounds: int = Field(
        2,
        ge=0,
        le=100,
        description="rounds over which the learning rate climbs linearly to its peak before the "
        "schedule [2: without it, Adam's first full-rate steps at batch 16 left centralized runs "
        "near chance for up to 20 epochs; over 20 paired 5-fold runs it raised centralized from "
        "49.7 to 58.5 % and lost no federated cell (BENCHMARKS.md, 'Learning-rate warm-up')]",
    )
    optimizer: Literal["adam", "sgd"] = Field("adam", description="optimizer of every model copy")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay")
    local_epochs: int = Field(1, ge=1, le=100, description="passes over local data per round")
    syncs_per_round: int = Field(
        16,
        ge=1,
        le=64,
        description="times per round the devices' halves are averaged (SL, SFLV1, SFLV2, "
        "FedAvg): each device trains 1/N of its round between two averages (a device with "
        "fewer batches than N averages after each batch); other algorithms average once. 16 "
        "beat 4 in every federated cell of the 5-fold matrix and brought SFLV1 x2 within a "
        "point of centralized (BENCHMARKS.md); 1 is the SplitFed paper's once per epoch",
    )
    split_batch: bool = Field(
        True,
        description="SFLV1, SFLV2 and FedAvg: each of a round's K devices trains on batches of "
        "batch_size / K (rounded, at least 2), so the devices' steps between two averages "
        "cover batch_size pictures together and an epoch takes centralized training's number "
        "of sequential steps. With whole batches each device takes 1/K of them: at 5 devices "
        "SFLV1 trailed centralized by 8.0 points, and by 0.2 sharing the batch (20 paired "
        "runs, BENCHMARKS.md, 'A batch shared by the devices')",
    )
    compression: Compression = Field("fp32", description="activations on the wire")
    grad_compression: GradCompression = Field("fp32", description="gradients on the wire")
    augment: bool = Field(True, description="augment training batches on the device")
    sflv2_order: Sflv2Order = Field(
        "lockstep",
        description="SFLV2's server schedule. lockstep: the clients' i-th batches together, "
        "in a random order, and one server step on their mean gradient, as centralized "
        "training steps once on the batch they share; interleaved: all clients' batches "
        "shuffled together, a server step on each; sequential: the clients one after another "
        "in a random order, a step on each batch (the SplitFed paper's description)",
    )
    jitter: JitterConfig = Field(
        default_factory=JitterConfig, description="geometric jitter when augmenting"
    )

    def device_batch(self, devices: int) -> int:
        """The batch each of `devices` devices that train side by side steps on (`split_batch`)."""
        if not self.split_batch or devices <= 1:
            return self.batch_size
        return max(2, round(self.batch_size / devices))

    def with_camera(self, p: float) -> TrainConfig:
        """These settings with the camera jitter applied at chance `p` (0: off)."""
        camera = self.jitter.camera.model_copy(update={"p": p})
        return self.model_copy(update={"jitter": self.jitter.model_copy(update={"camera": camera})})

    def with_geometry(self, **geometry: float) -> TrainConfig:
        """These settings with the geometric jitter's `scale`, `rotation` or `shift_y` replaced,
        checked against JitterConfig's bounds (pydantic's ValidationError otherwise)."""
        jitter = JitterConfig.model_validate({**self.jitter.model_dump(), **geometry})
        return self.model_copy(update={"jitter": jitter})


# The server learning rates given by name (`AggregationConfig.server_lr_for`).
SERVER_LR_NAMES = ("auto", "sqrt")


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
    server_opt: Literal["none", "sgd", "momentum", "adam"] = Field(
        "none",
        description="server optimizer on the aggregate: none (FedAvg), sgd (FedAvg with a "
        "server learning rate), momentum (FedAvgM), adam (FedAdam); "
        "splitfed.algorithms.server_opt",
    )
    server_lr: float | Literal["auto", "sqrt"] | None = Field(
        None,
        description="server learning rate; auto: the number of copies combined, so the step is "
        "the sum of the devices' updates; sqrt: its square root, which gives K devices that "
        "each took Adam steps on 1/K of a shared batch centralized training's step size "
        "[auto for sgd, 1.0 for momentum, 0.01 for adam]",
    )
    server_momentum: float = Field(
        0.9, ge=0, lt=1, description="momentum (FedAvgM) or Adam's beta1 (FedAdam)"
    )

    @field_validator("server_lr")
    @classmethod
    def _positive_lr(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and v <= 0:
            raise ValueError("the server learning rate must be positive")
        return v

    @staticmethod
    def parse_server_lr(text: str | float) -> float | str:
        """`--server-lr` as typed: `auto`, `sqrt` or a number (ValueError otherwise)."""
        return text if text in SERVER_LR_NAMES else float(text)

    def server_lr_for(self, copies: int) -> float:
        """The server learning rate of a round that combines `copies` copies of a half."""
        lr = self.server_lr
        if lr is None:
            lr = "auto" if self.server_opt == "sgd" else 0.01 if self.server_opt == "adam" else 1.0
        if lr == "auto":
            return float(copies)
        return math.sqrt(copies) if lr == "sqrt" else lr
