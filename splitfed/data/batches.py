"""Seeded mini-batches with augmentation that suits eye crops.

Every algorithm draws its batches from here, keyed by (run seed, round, client index), so that
centralized training and any split of it see exactly the same pixels in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from splitfed.config import JitterConfig
from splitfed.data.dataset import EmotionDataset

# Normalisation applied on the device before the client half; recorded in export manifests.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float32."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return x.sub_(PIXEL_MEAN).div_(PIXEL_STD)


def augment_batch(
    x: torch.Tensor,
    gen: torch.Generator,
    max_shift: int = 4,
    jitter: JitterConfig | None = None,
) -> torch.Tensor:
    """Mirror, small shifts, brightness/contrast changes and, with `jitter`, geometric jitter.

    Mirroring an eye crop swaps the eyes but keeps the expression; shifts stand in for detector
    jitter; brightness and contrast for lighting. The jitter (zoom, roll, band offset) is drawn
    after everything else, so without it the draws, and the numbers, are what they always were.
    """
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    idx_n = torch.arange(n)[:, None, None, None]
    x = padded[idx_n, torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    gain = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    bias = 0.3 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    x = x * gain + bias
    if jitter is not None and jitter.enabled:
        x = geometric_jitter(x, gen, jitter)
    return x


def geometric_jitter(x: torch.Tensor, gen: torch.Generator, jitter: JitterConfig) -> torch.Tensor:
    """Zoom, roll and move the band vertically, per crop, drawn uniformly from `gen`.

    One bilinear resampling with the border pixels repeated, as a detector's band that reaches
    past the face would show the nearest skin.
    """
    n, _, h, w = x.shape
    zoom = 1.0 + jitter.scale * (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)
    angle = math.radians(jitter.rotation) * (
        torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    )
    shift = jitter.shift_y * (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)
    # affine_grid maps output to input positions in [-1, 1] per axis; work in pixels centred on
    # the crop (input = R(-angle) output / zoom + offset) and rescale the axes for the aspect.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h
    theta[:, 1, 1] = cos
    theta[:, 1, 2] = 2.0 * shift
    grid = torch.nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def num_batches(n: int, batch_size: int) -> int:
    """Batches in one epoch; a final batch of one sample is dropped (BatchNorm needs two)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def iterate_batches(
    ds: EmotionDataset,
    batch_size: int,
    key: tuple[int, ...],
    epochs: int = 1,
    train: bool = True,
    augment: bool = True,
    jitter: JitterConfig | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches for `epochs` passes; shuffled and augmented when `train`.

    Pass `TrainConfig.jitter` as `jitter` wherever a model copy trains, so all copies agree.
    """
    n = len(ds)
    for epoch in range(epochs):
        if train:
            order = np.random.default_rng([*key, epoch]).permutation(n)
            gen = torch.Generator().manual_seed(
                int(np.random.default_rng([*key, epoch, 7]).integers(2**62))
            )
        else:
            order = np.arange(n)
        nb = num_batches(n, batch_size) if train else -(-n // batch_size)
        for b in range(nb):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = to_tensor(ds.images[idx])
            if train and augment:
                x = augment_batch(x, gen, jitter=jitter)
            yield x, torch.from_numpy(ds.labels[idx])
