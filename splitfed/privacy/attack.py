"""White-box model inversion, played as an honest-but-curious aggregator would play it.

The aggregator of SFLV1/SFLV2 holds the client half (it averages it) and receives every smashed
batch. Two attacks use exactly that:

- a learned decoder: transposed convolutions trained on an auxiliary set of *other* people,
  fed with what the device puts on the wire under the defence measured (`to_wire`: noise and
  quantization included), with early stopping on the attacker's own validation people;
- an optimisation attack: gradient descent on an input until the known client half maps it to
  the received activations, started from the population's mean crop.

The report keeps the stronger. A weak attacker is a false assurance, so the decoder is given
capacity, Adam, an L1 + SSIM loss and enough epochs; only the tests shrink it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.data.batches import PIXEL_MEAN, PIXEL_STD, to_tensor
from splitfed.defences import DefenceConfig, received, to_wire
from splitfed.privacy.metrics import ssim_torch
from splitfed.wire import Compression


class AttackConfig(BaseModel):
    """Strength of the attacker; the defaults are the report's, the tests use smaller ones."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(60, ge=1, description="most decoder epochs over the auxiliary people")
    patience: int = Field(8, ge=1, description="epochs without validation gain before stopping")
    batch_size: int = Field(
        16, ge=2, description="decoder mini-batch; small batches fit faster on few people"
    )
    lr: float = Field(2e-3, gt=0, description="Adam learning rate of the decoder")
    width: int = Field(32, ge=4, description="channels of the decoder's last stage")
    ssim_weight: float = Field(0.5, ge=0, description="weight of 1 - SSIM next to L1")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of aux people for validation")
    inversion_steps: int = Field(
        100, ge=0, description="gradient steps of the optimisation attack (0: skip it)"
    )
    inversion_lr: float = Field(0.01, gt=0, description="Adam learning rate on the input")
    inversion_tv: float = Field(0.02, ge=0, description="total-variation prior of the inversion")
    seed: int = Field(0, description="attacker's seed")


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 crops -> float in [0, 1]: what reconstructions are scored against."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


def wire_activations(
    client_net: nn.Module,
    images: np.ndarray,
    defence: DefenceConfig,
    compression: Compression,
    key: tuple[int, ...],
    batch_size: int = 256,
) -> tuple[torch.Tensor, float]:
    """(decoded wire activations, bytes per sample) of `images`, batch by batch via `to_wire`."""
    client_net.eval()
    out: list[torch.Tensor] = []
    total_bytes = 0.0
    with torch.no_grad():
        for b, start in enumerate(range(0, len(images), batch_size)):
            x = to_tensor(images[start : start + batch_size])
            batch = to_wire(client_net, x, defence, compression, (*key, b))
            out.append(received(batch.tensors))
            total_bytes += batch.bytes_per_sample * len(x)
    return torch.cat(out), total_bytes / max(len(images), 1)


class Decoder(nn.Module):
    """Smashed data (C, h, w) -> crop (1, H, W): a conv, then upsampling stages to full size."""

    def __init__(
        self, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int], width: int
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        oc, oh, ow = out_shape
        ups = max(0, round(math.log2(max(oh / h, 1))))
        chans = [min(width * 2**i, 256) for i in range(ups, -1, -1)]
        layers: list[nn.Module] = [
            nn.Conv2d(c, chans[0], 3, padding=1),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(chans[0], chans[0], 3, padding=1),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(inplace=True),
        ]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(chans[-1], oc, 3, padding=1)
        self.out_size = (oh, ow)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.head(self.body(z))
        if tuple(y.shape[-2:]) != self.out_size:
            y = nn.functional.interpolate(y, self.out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(y)


def _loss(pred: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    l1 = (pred - target).abs().mean()
    if ssim_weight <= 0:
        return l1
    return l1 + ssim_weight * (1 - ssim_torch(pred, target).mean())


@dataclass
class TrainedDecoder:
    decoder: Decoder
    epochs: int  # epochs run before early stopping
    best_val_loss: float

    def reconstruct(self, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        self.decoder.eval()
        with torch.no_grad():
            return torch.cat(
                [self.decoder(z[i : i + batch_size]) for i in range(0, len(z), batch_size)]
            )


def train_decoder(
    z_train: torch.Tensor,
    x_train: torch.Tensor,
    z_val: torch.Tensor,
    x_val: torch.Tensor,
    cfg: AttackConfig,
) -> TrainedDecoder:
    """Fit the decoder on the auxiliary people; keep the state that did best on held-out ones."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        decoder = Decoder(
            tuple(z_train.shape[1:]),  # type: ignore[arg-type]
            tuple(x_train.shape[1:]),  # type: ignore[arg-type]
            cfg.width,
        )
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    best, best_state, stale = math.inf, copy.deepcopy(decoder.state_dict()), 0
    trained = TrainedDecoder(decoder, 0, math.inf)
    for epoch in range(1, cfg.epochs + 1):
        trained.epochs = epoch
        decoder.train()
        order = torch.randperm(len(z_train), generator=gen)
        for i in range(0, len(order) - 1, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:
                continue
            loss = _loss(decoder(z_train[idx]), x_train[idx], cfg.ssim_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        val = float(_loss(trained.reconstruct(z_val), x_val, cfg.ssim_weight))
        if val < best - 1e-4:
            best, best_state, stale = val, copy.deepcopy(decoder.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    decoder.load_state_dict(best_state)
    trained.best_val_loss = best
    return trained


def invert(
    client_net: nn.Module,
    z_target: torch.Tensor,
    start: torch.Tensor,
    cfg: AttackConfig,
    batch_size: int = 128,
) -> torch.Tensor:
    """Optimisation attack: inputs in [0, 1] whose client-half output matches `z_target`.

    Starts from `start` (the population's mean crop) and descends on the input through the
    known client half, with a small total-variation prior against pixel noise.
    """
    client_net.eval()
    for p in client_net.parameters():
        p.requires_grad_(False)
    out: list[torch.Tensor] = []
    try:
        for i in range(0, len(z_target), batch_size):
            z = z_target[i : i + batch_size]
            logit = torch.logit(start.clamp(0.02, 0.98)).expand(len(z), *start.shape[-3:])
            u = logit.clone().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=cfg.inversion_lr)
            scale = z.pow(2).mean().clamp_min(1e-8)
            for _ in range(cfg.inversion_steps):
                x = torch.sigmoid(u)
                h = client_net((x - PIXEL_MEAN) / PIXEL_STD)
                tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
                    x[..., :, 1:] - x[..., :, :-1]
                ).abs().mean()
                loss = (h - z).pow(2).mean() / scale + cfg.inversion_tv * tv
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            out.append(torch.sigmoid(u).detach())
    finally:
        for p in client_net.parameters():
            p.requires_grad_(True)
    return torch.cat(out)
