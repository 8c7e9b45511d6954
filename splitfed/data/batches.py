"""Seeded mini-batches with augmentation that suits eye crops.

Every algorithm draws its batches from here, keyed by (run seed, round, client index), so that
centralized training and any split of it see exactly the same pixels in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from splitfed.config import CameraConfig, JitterConfig
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
    """Mirror, small shifts, brightness/contrast changes and, with `jitter`, another detector's
    band (zoom, roll, offset) and another camera's look (`jitter.camera`).

    Mirroring an eye crop swaps the eyes but keeps the expression; shifts stand in for detector
    jitter; brightness and contrast for lighting. The jitter is drawn after everything else,
    geometry before camera, so without it the draws, and the numbers, are what they always were.
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
    if jitter is not None and jitter.geometric:
        x = geometric_jitter(x, gen, jitter)
    if jitter is not None and jitter.camera.enabled:
        x = camera_jitter(x, gen, jitter.camera)
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


def _uniform(n: int, gen: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) blurred by a separable Gaussian of `sigma` pixels, borders repeated."""
    r = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    y = F.pad(img[None], (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """(C, H, W) grey levels through a JPEG encoder and decoder (OpenCV's libjpeg)."""
    u8 = img.clamp(0, 255).round().to(torch.uint8).numpy()
    hwc = u8[0] if u8.shape[0] == 1 else np.ascontiguousarray(u8.transpose(1, 2, 0))
    ok, buf = cv2.imencode(".jpg", hwc, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if u8.shape[0] == 1 else cv2.IMREAD_COLOR)
    out = out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(out)).to(img.dtype)


def camera_jitter(
    x: torch.Tensor,
    gen: torch.Generator,
    cam: CameraConfig,
    *,
    noise_gen: torch.Generator | None = None,
    window: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Another camera per crop, in the order a camera works: the tone curve and the light, the
    lens, the sensor's resolution and noise, the encoder.

    Each change is applied with probability `cam.p` at a size drawn uniformly up to its
    maximum. Every draw is made for every crop whether applied or not, so the draws depend
    only on the batch size and `gen`. Works in grey levels; a changed crop saturates at 0 and
    255 as a sensor does.

    For pieces of pictures (a data owner's part of each crop, a row band, a clip's frame):
    `noise_gen` gives the sensor noise instead of `gen`, whose draws then depend on the batch
    size alone, not on the piece's size, so pieces of one picture draw the same camera from
    generators seeded alike; `window` (y0, x0, height, width) says that `x` lies at (y0, x0)
    in pictures of that size, so the light ramp runs across the whole picture, not the piece.
    """
    n, c, h, w = x.shape
    on = torch.rand(n, 6, generator=gen) < cam.p
    gam = 2.0 ** (cam.gamma * _uniform(n, gen, -1.0, 1.0))
    ang = _uniform(n, gen, 0.0, 2.0 * math.pi)
    ramp_size = _uniform(n, gen, 0.0, cam.gradient)
    sigma = _uniform(n, gen, 0.0, cam.blur)
    factor = _uniform(n, gen, 1.0, cam.lowres)
    noise_std = _uniform(n, gen, 0.0, cam.noise)
    quality = torch.randint(cam.jpeg, 96, (n,), generator=gen)
    noise = torch.randn(
        n, c, h, w, generator=gen if noise_gen is None else noise_gen, dtype=x.dtype
    )
    changed = on.any(1)[:, None, None, None]
    g = (x * PIXEL_STD + PIXEL_MEAN) * 255.0
    g = torch.where(changed, g.clamp(0.0, 255.0), g)

    def where(k: int, y: torch.Tensor) -> torch.Tensor:
        return torch.where(on[:, k, None, None, None], y, g)

    g = where(0, 255.0 * (g / 255.0).pow(gam.to(x.dtype)[:, None, None, None]))
    y0, x0, full_h, full_w = window if window is not None else (0, 0, h, w)
    yy = ((torch.arange(h, dtype=x.dtype) + y0) / max(full_h - 1, 1) - 0.5)[None, :, None]
    xx = ((torch.arange(w, dtype=x.dtype) + x0) / max(full_w - 1, 1) - 0.5)[None, None, :]
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    ramp = (xx * cos[:, None, None] + yy * sin[:, None, None]) / (cos.abs() + sin.abs())[
        :, None, None
    ]  # from -1/2 to 1/2 corner to corner, whatever the direction
    g = where(1, g + (ramp_size.to(x.dtype)[:, None, None] * ramp)[:, None])
    g = g.clone()
    for i in range(n):
        if on[i, 2] and float(sigma[i]) > 0.1:
            g[i] = _gaussian_blur(g[i], float(sigma[i]))
        if on[i, 3]:
            size = (max(1, round(h / float(factor[i]))), max(1, round(w / float(factor[i]))))
            small = F.interpolate(g[i : i + 1], size=size, mode="area")
            g[i] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    g = where(4, g + noise_std.to(x.dtype)[:, None, None, None] * noise)
    for i in range(n):
        if on[i, 5]:
            g[i] = _jpeg(g[i], int(quality[i]))
    g = torch.where(changed, g.clamp(0.0, 255.0), g)
    return (g / 255.0 - PIXEL_MEAN) / PIXEL_STD


def num_batches(n: int, batch_size: int) -> int:
    """Batches in one epoch; a final batch of one sample is dropped (BatchNorm needs two)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def part_bounds(n_batches: int, part: int, parts: int) -> tuple[int, int]:
    """The batches [lo, hi) of a round's `n_batches` that part `part` of `parts` trains.

    `TrainConfig.syncs_per_round`: the device and the aggregator both cut a round this way, so
    the parts cover every batch once, in order, and differ in length by one batch at most.
    """
    return part * n_batches // parts, (part + 1) * n_batches // parts


def keyed_generator(*key: int) -> torch.Generator:
    """A torch generator seeded from `key` alone, so every party that knows the key draws alike."""
    return torch.Generator().manual_seed(int(np.random.default_rng(list(key)).integers(2**62)))


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
            gen = keyed_generator(*key, epoch, 7)
        else:
            order = np.arange(n)
        nb = num_batches(n, batch_size) if train else -(-n // batch_size)
        for b in range(nb):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = to_tensor(ds.images[idx])
            if train and augment:
                x = augment_batch(x, gen, jitter=jitter)
            yield x, torch.from_numpy(ds.labels[idx])
