"""What the client half's *weights* give away: inverting one device's update between averages.

In SFLV1 and SFLV2 the aggregator receives each device's client half after every part of a round
(`TrainConfig.syncs_per_round` parts). Next to the smashed data it therefore holds, per part:

- the client half before the part (it sent it) and after (the device uploads it for averaging);
- the gradient it returned for every batch of the part, sample by sample, in order;
- the wire activations of every batch, under whatever defence the device applies.

`observe_part` plays one device's part with the runtime's own arithmetic (`to_wire`, the server
half's cross-entropy, `nopeek_backward`, the device's optimizer kept across parts, the averaged
weights loaded in place before each part) and returns exactly those observations.

The attacker is learned, as the activation attack's decoder is, because gradient matching
(Geiping et al. 2020) did not work here: with the device's Adam, the change is only loosely
aligned with the part's gradient (cosine about 0.5: momentum carries earlier parts, and every
coordinate is rescaled), and the per-crop standardisation makes the gradient blind to each
crop's brightness and contrast. Matching it for 300 to 1,000 steps, from the population's mean
crop, with or without the running-statistics and activation terms, ended *below* the mean crop's
SSIM even with an exact one-picture SGD gradient. So the attacker instead plays parts of its own
auxiliary people through the known half, with its own copy of the device's optimizer, and
trains the activation attack's decoder (`splitfed.privacy.attack.train_decoder`) on (the
change's principal components, per-sample server gradient, wire activations) -> crop, stacked
as channels. The same decoder without the change is the ablation: the difference is what the
weights add to what the activations already give away.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.config import TrainConfig
from splitfed.data.batches import to_tensor
from splitfed.defences import DefenceConfig, nopeek_backward, received, to_wire
from splitfed.privacy.attack import AttackConfig, pixels, train_decoder
from splitfed.privacy.metrics import baseline_ssim, ssim
from splitfed.training import make_optimizer
from splitfed.wire import Compression


class UpdateAttackConfig(BaseModel):
    """Strength of the update-inversion attacker; the tests shrink it."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(4096, ge=8, description="training crops, in parts of the victim's size")
    decoder: AttackConfig = Field(
        default_factory=lambda: AttackConfig(inversion_steps=0),
        description="the decoder's training: epochs, patience, batch, lr, width, loss",
    )


@dataclass
class ObservedPart:
    """What the aggregator holds after one device's part."""

    before: dict[str, torch.Tensor]  # client half's state dict before the part
    after: dict[str, torch.Tensor]  # ... and the one the device uploaded after it
    grads: list[torch.Tensor]  # the server's gradient for each batch, per sample
    wire: list[torch.Tensor]  # the decoded activations of each batch
    crops: list[torch.Tensor]  # ground truth, pixels in [0, 1]: never shown to the attacker


def observe_part(
    client_net: nn.Module,
    server_net: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[np.ndarray, np.ndarray]],
    defence: DefenceConfig,
    compression: Compression,
    key: tuple[int, ...],
) -> ObservedPart:
    """Train `client_net` on `batches` (uint8 crops, labels) as a device does, and record.

    `opt` is the device's optimizer over `client_net`, kept across calls as the runtime keeps
    it across parts. The server half computes each gradient in training mode, as
    `CNNStrategy.server_step` does, but is not stepped: one part's worth of server updates
    barely moves the gradients and the attacker knows them either way.
    """
    loss_fn = nn.CrossEntropyLoss()
    before = {k: v.detach().clone() for k, v in client_net.state_dict().items()}
    grads, wires, crops = [], [], []
    server_net.train()
    for step, (images, labels) in enumerate(batches):
        x = to_tensor(images)
        client_net.train()
        wire = to_wire(client_net, x, defence, compression, (*key, step))
        act = received(wire.tensors).requires_grad_(True)
        loss = loss_fn(server_net(act), torch.from_numpy(labels).long())
        (grad,) = torch.autograd.grad(loss, act)
        opt.zero_grad(set_to_none=True)
        nopeek_backward(x, wire, grad, defence)
        opt.step()
        grads.append(grad.detach())
        wires.append(act.detach())
        crops.append(pixels(images))
    after = {k: v.detach().clone() for k, v in client_net.state_dict().items()}
    return ObservedPart(before, after, grads, wires, crops)


def change_vector(part: ObservedPart) -> torch.Tensor:
    """The part's change of every float tensor (weights and running statistics), unit RMS.

    The size of a change says more about the device's optimizer state than about its crops,
    so only its shape is kept.
    """
    keys = [k for k, v in part.before.items() if v.is_floating_point()]
    v = torch.cat([(part.after[k] - part.before[k]).flatten() for k in keys])
    return v / v.pow(2).mean().sqrt().clamp_min(1e-12)


@dataclass
class Observed:
    """One part, reduced to what the attack reads: per sample, with the part's change."""

    change: torch.Tensor  # (P,) from `change_vector`
    wire: torch.Tensor  # (B, C, h, w)
    grads: torch.Tensor  # (B, C, h, w), unit RMS over the part
    crops: torch.Tensor  # (B, 1, H, W) ground truth
    rows: np.ndarray  # (B,) which of the device's pictures, for scoring


def reduce(part: ObservedPart, rows: np.ndarray) -> Observed:
    g = torch.cat(part.grads)
    return Observed(
        change_vector(part),
        torch.cat(part.wire),
        g / g.pow(2).mean().sqrt().clamp_min(1e-12),
        torch.cat(part.crops),
        rows,
    )


def play_parts(
    client_net: nn.Module,
    server_net: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    batch: int,
    batches: int,
    parts: int,
    train: TrainConfig,
    defence: DefenceConfig,
    compression: Compression,
    seed: int,
) -> list[Observed]:
    """`parts` parts of one device holding `images`, each from the same global client half.

    Like a device, the copy keeps one optimizer across parts and loads the global weights in
    place before each; a first part, not returned, gives the optimizer a history. Each part
    draws `batches` batches of `batch` crops at random.
    """
    device = copy.deepcopy(client_net)
    global_state = {k: v.clone() for k, v in client_net.state_dict().items()}
    opt = make_optimizer(device.parameters(), train)
    rng = np.random.default_rng([seed, 0x0B5])
    out: list[Observed] = []
    for p in range(parts + 1):
        device.load_state_dict(global_state)
        chosen = [rng.choice(len(images), batch, replace=False) for _ in range(batches)]
        part = observe_part(
            device,
            server_net,
            opt,
            [(images[i], labels[i]) for i in chosen],
            defence,
            compression,
            (seed, p),
        )
        if p:
            out.append(reduce(part, np.concatenate(chosen)))
    return out


class ChangeBasis:
    """The attacker's principal components of the changes it played: a learned projection."""

    def __init__(self, changes: torch.Tensor, components: int) -> None:
        q = max(1, min(components, changes.shape[0] - 1, changes.shape[1]))
        self.mean = changes.mean(0)
        _, s, v = torch.pca_lowrank(changes - self.mean, q=q, center=False)
        self.v = v  # (P, q)
        self.scale = (s / math.sqrt(max(changes.shape[0] - 1, 1))).clamp_min(1e-8)
        self.components = components

    def project(self, changes: torch.Tensor) -> torch.Tensor:
        """(N, P) -> (N, components), each standardised, zero-padded past the fitted rank."""
        c = (changes - self.mean) @ self.v / self.scale
        return nn.functional.pad(c, (0, self.components - c.shape[1]))


def attack_inputs(
    observed: list[Observed], basis: ChangeBasis | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder inputs, crops): per sample, its wire activations and gradient, and without
    `basis` nothing else; with it, the part's projected change as further channels."""
    xs, crops = [], []
    for o in observed:
        channels = [o.wire, o.grads]
        if basis is not None:
            b, _, h, w = o.wire.shape
            proj = basis.project(o.change[None]).view(1, -1, h, w).expand(b, -1, h, w)
            channels.append(proj)
        xs.append(torch.cat(channels, 1))
        crops.append(o.crops)
    return torch.cat(xs), torch.cat(crops)


@dataclass
class UpdateLeakage:
    """SSIM of the decoder's crops on the victim's parts, with and without the change."""

    ssim_with_update: float
    ssim_activations_only: float
    ssim_baseline: float
    reconstructions: torch.Tensor  # with the change, in the order of `rows`
    crops: torch.Tensor
    rows: np.ndarray  # which of the victim's pictures each reconstruction is


def measure_update_leakage(
    client_net: nn.Module,
    server_net: nn.Module,
    aux: tuple[np.ndarray, np.ndarray],
    aux_val: tuple[np.ndarray, np.ndarray],
    victim: tuple[np.ndarray, np.ndarray],
    batch: int,
    batches: int,
    victim_parts: int,
    train: TrainConfig,
    defence: DefenceConfig,
    compression: Compression,
    cfg: UpdateAttackConfig,
) -> UpdateLeakage:
    """Train the decoders on parts the attacker plays itself, score them on the victim's.

    The victim's parts are played by a device with its own optimizer and noise keys; the
    attacker's parts on its auxiliary people (`aux`, early stopping on `aux_val`).
    """
    per_part = batch * batches
    n_train = max(2, cfg.samples // per_part)
    n_val = max(2, n_train // 4)
    play = dict(train=train, defence=defence, compression=compression)
    own = play_parts(client_net, server_net, *aux, batch, batches, n_train, seed=11, **play)
    val = play_parts(client_net, server_net, *aux_val, batch, batches, n_val, seed=12, **play)
    victims = play_parts(
        client_net, server_net, *victim, batch, batches, victim_parts, seed=13, **play
    )
    h, w = own[0].wire.shape[-2:]
    channels = max(1, math.ceil(min(256, n_train - 1) / (h * w)))
    basis = ChangeBasis(torch.stack([o.change for o in own]), channels * h * w)
    scores: dict[str, float] = {}
    shown = torch.empty(0)
    truth = torch.empty(0)
    for name, b in (("update", basis), ("activations", None)):
        x_tr, y_tr = attack_inputs(own, b)
        x_va, y_va = attack_inputs(val, b)
        x_vi, truth = attack_inputs(victims, b)
        rec = train_decoder(x_tr, y_tr, x_va, y_va, cfg.decoder).reconstruct(x_vi)
        scores[name] = float(ssim(rec, truth).mean())
        if b is not None:
            shown = rec
    population = pixels(np.concatenate([aux[0], aux_val[0]]))
    return UpdateLeakage(
        scores["update"],
        scores["activations"],
        float(baseline_ssim(population, truth).mean()),
        shown,
        truth,
        np.concatenate([o.rows for o in victims]),
    )
