"""What leaves the device: crops -> client half -> defence -> compression, in one function.

The device runtime, the simulator and the privacy report all call `to_wire`, so the leakage the
report measures is the leakage of the product. The defences are composable device-side
transforms in the spirit of Flower's client mods:

- activation noise: Gaussian noise on the smashed data, `noise` times each sample's own
  activation standard deviation, so one sigma means the same thing at every cut;
- NoPeek: a distance-correlation penalty between the input batch and the smashed batch that the
  client adds to its loss with weight `nopeek` (`nopeek_backward`);
- cut, bottleneck and compression: the deeper the cut, the narrower the 1x1 bottleneck and the
  coarser the quantization, the less of the crop survives on the wire.

Noise draws are seeded from the caller's key like every other draw of the project, so runs are
reproducible. The key must contain something the aggregator does not know (a device secret):
the aggregator chooses the run seed, and noise it can regenerate it can also subtract.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.errors import UserError
from splitfed.model import ModelConfig, generator
from splitfed.wire import Compression, pack_activations, unpack_activations

NOISE_STREAM = 2  # key index of the noise; `seeded` streams 0 and 1 are the halves' dropout


class DefenceConfig(BaseModel):
    """One device-side defence setting; fields left at None keep the run's own model/train value."""

    model_config = ConfigDict(extra="forbid")

    noise: float = Field(
        0.0, ge=0.0, le=100.0, description="Gaussian noise std, relative to each sample's std"
    )
    nopeek: float = Field(
        0.0, ge=0.0, le=100.0, description="weight of the NoPeek distance-correlation loss"
    )
    cut: int | None = Field(None, ge=1, description="conv blocks on the device (None: the run's)")
    bottleneck: int | None = Field(
        None, ge=1, description="channels of a 1x1 conv at the cut (None: the run's)"
    )
    compression: Compression | None = Field(
        None, description="activations on the wire (None: the run's)"
    )

    def model(self, base: ModelConfig) -> ModelConfig:
        """The model this defence trains: the base with the cut and bottleneck overridden."""
        update: dict[str, object] = {}
        if self.cut is not None:
            update["cut"] = self.cut
        if self.bottleneck is not None:
            update["bottleneck"] = self.bottleneck
        return ModelConfig.model_validate({**base.model_dump(), **update})

    def wire_compression(self, base: Compression) -> Compression:
        return self.compression or base


DEFENCES: dict[str, DefenceConfig] = {
    "none": DefenceConfig(),
    "noise-0.5": DefenceConfig(noise=0.5),
    "noise-1": DefenceConfig(noise=1.0),
    "noise-2": DefenceConfig(noise=2.0),
    "nopeek-1": DefenceConfig(nopeek=1.0),
    "cut-3": DefenceConfig(cut=3),
    "bottleneck-8": DefenceConfig(bottleneck=8),
    "int8": DefenceConfig(compression="int8"),
    "noise-1-int8": DefenceConfig(noise=1.0, compression="int8"),
    "cut-3-noise-1-int8": DefenceConfig(cut=3, noise=1.0, compression="int8"),
    # Combinations measured by the sweep of issue 11 (scripts/bench_privacy.py).
    "cut-3-bottleneck-8": DefenceConfig(cut=3, bottleneck=8),
    "bottleneck-8-noise-1-int8": DefenceConfig(bottleneck=8, noise=1.0, compression="int8"),
    "nopeek-1-noise-1": DefenceConfig(nopeek=1.0, noise=1.0),
    "cut-3-noise-2-int8": DefenceConfig(cut=3, noise=2.0, compression="int8"),
    "cut-3-bottleneck-8-noise-1-int8": DefenceConfig(
        cut=3, bottleneck=8, noise=1.0, compression="int8"
    ),
    # Every conv block on the device, no bottleneck: measured with warm-up (2026-12-06).
    "cut-4-noise-1-int8": DefenceConfig(cut=4, noise=1.0, compression="int8"),
    "cut-4-noise-1.5-int8": DefenceConfig(cut=4, noise=1.5, compression="int8"),
    "cut-4-noise-2-int8": DefenceConfig(cut=4, noise=2.0, compression="int8"),
}

# `recommended` is cut-4-noise-2-int8: every conv block on the device, noise 2 sigma, int8
# (BENCHMARKS.md, "A deeper cut without a bottleneck"; synthetic, with warm-up). Against no
# defence, seeds 0, 1 and 2: SSIM +0.015, +0.010 and +0.031 over the mean crop (target <=
# 0.05); re-identification 18, 28 and 37 % (chance 14 %, target <= 2x: missed on seed 2);
# accuracy 3.6 +- 0.6 points lower over 10 cross-validated runs (the target is 2). It replaced
# cut-3-bottleneck-8-noise-1-int8, which leaked about as much (+0.020, +0.020, +0.041; 25, 28,
# 28 %) and cost 7.6 +- 1.4 points: at cut 4 a bottleneck of 8 or 16 channels under noise 1
# cost 8.2 and 5.5 points, none cost nothing. Its price is bytes: the device's half has 211k
# parameters (73k before), so SFLV1 x2 sent 3.3x the bytes a round (65.5 against 19.9 MB).
DEFENCES["recommended"] = DEFENCES["cut-4-noise-2-int8"]


# What `simulate` and `serve` apply when no --defence is named, on the algorithms that send
# smashed data (sl, sflv1, sflv2); the others send none and get `none`.
DEFAULT_DEFENCE = "recommended"
DEFAULT_HELP = (
    f"{DEFAULT_DEFENCE} for sl, sflv1 and sflv2 (the algorithms that send smashed data), "
    "none for the others; --defence none turns it off"
)


def default_defence(algo: str) -> str:
    """The defence a run of `algo` gets when none is named: see DEFAULT_DEFENCE."""
    from splitfed.algorithms.cnn import SMASHED_ALGORITHMS  # imports this module

    return DEFAULT_DEFENCE if algo in SMASHED_ALGORITHMS else "none"


def get_defence(name: str) -> DefenceConfig:
    """The registered setting `name`; an unknown name is a user error listing the known ones."""
    try:
        return DEFENCES[name]
    except KeyError:
        raise UserError(f"unknown defence {name!r}: choose from {', '.join(DEFENCES)}") from None


@dataclass
class WireBatch:
    """What one batch puts on the wire, and what the device keeps to apply the gradient."""

    tensors: dict[str, np.ndarray]  # pack_activations output: exactly the message payload
    activations: torch.Tensor  # client-half output before noise, with its graph when training

    @property
    def bytes_per_sample(self) -> float:
        n = max(int(self.activations.shape[0]), 1)
        return sum(int(v.nbytes) for v in self.tensors.values()) / n


def add_noise(act: torch.Tensor, sigma: float, key: tuple[int, ...]) -> torch.Tensor:
    """`act` plus Gaussian noise of `sigma` times each sample's std, drawn from `key`."""
    if sigma <= 0:
        return act
    eps = torch.randn(act.shape, dtype=act.dtype, generator=generator(*key, NOISE_STREAM))
    scale = act.detach().flatten(1).std(dim=1).clamp_min(1e-6)
    return act + sigma * scale.view(-1, *([1] * (act.dim() - 1))) * eps


def to_wire(
    client_net: torch.nn.Module,
    x: torch.Tensor,
    defence: DefenceConfig,
    compression: Compression,
    key: tuple[int, ...],
) -> WireBatch:
    """Crops -> client half -> defence -> compression: the one path to the wire.

    `key` seeds the noise (e.g. run seed, round, client, step, device secret). The client half
    runs in whatever mode the caller set and keeps its graph when grad is enabled, so a training
    step backpropagates the server's gradient into `WireBatch.activations` (noise and
    quantization pass the gradient straight through).
    """
    act = client_net(x)
    sent = add_noise(act, defence.noise, key)
    tensors = pack_activations(sent.detach().numpy(), defence.wire_compression(compression))
    return WireBatch(tensors, act)


def received(tensors: dict[str, np.ndarray]) -> torch.Tensor:
    """What the aggregator decodes from a wire payload (the attacker's input)."""
    return torch.from_numpy(unpack_activations(tensors))


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of two batches (Szekely et al. 2007), differentiable.

    0 for independent data (in the limit), 1 for data equal up to a similarity; NoPeek
    (Vepakomma et al. 2020) minimises it between the input and the smashed data.
    """
    if x.shape[0] != z.shape[0]:
        raise ValueError("distance correlation needs batches of equal size")
    if x.shape[0] < 2:
        raise ValueError("distance correlation needs at least two samples")

    def centred(v: torch.Tensor) -> torch.Tensor:
        v = v.flatten(1).to(torch.float64)
        d = torch.cdist(v, v).clamp_min(0)
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(z)
    dcov_xz = (a * b).mean()
    dvar = (a * a).mean() * (b * b).mean()
    if float(dvar.detach()) <= 0:
        return torch.zeros((), dtype=torch.float64)
    return (dcov_xz.clamp_min(0) / dvar.sqrt() + 1e-12).sqrt().to(z.dtype)


def nopeek_backward(
    x: torch.Tensor, batch: WireBatch, grad: torch.Tensor, defence: DefenceConfig
) -> None:
    """Backpropagate the server's gradient plus the NoPeek penalty into the client half.

    Equal to `batch.activations.backward(grad)` when `defence.nopeek` is 0, so the client
    runtime can always call this one line.
    """
    act = batch.activations
    if defence.nopeek <= 0:
        act.backward(grad)
        return
    loss = (act * grad).sum() + defence.nopeek * distance_correlation(x, act)
    loss.backward()
