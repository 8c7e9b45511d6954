"""How much of a face a reconstruction gives away: SSIM, PSNR, a no-information baseline, re-id.

Images are float arrays in [0, 1], shaped (N, H, W) or (N, 1, H, W). SSIM follows Wang et al.
(2004) exactly as scikit-image computes it with `gaussian_weights=True` (11-tap window of
sigma 1.5, population covariances, the border of half a window left out), so the numbers can be
compared with other work; the tests hold it to scikit-image.

Eye crops are alike, so a raw SSIM says little: the population's mean crop already scores high.
The leakage is the gap between a reconstruction and that baseline, and whether the
reconstruction still picks out the right person from a gallery.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIGMA = 1.5
RADIUS = 5  # int(3.5 * sigma + 0.5), scipy's truncation as scikit-image uses it
K1, K2 = 0.01, 0.03


def _as_batch(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a.detach())
    t = t.to(torch.float64)
    if t.dim() == 2:
        t = t[None]
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"expected (N, H, W) or (N, 1, H, W) grey images, got {tuple(t.shape)}")
    return t


def _window() -> torch.Tensor:
    r = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / SIGMA) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of (N, 1, H, W) tensors, differentiable (the attacker's loss uses it)."""
    if min(x.shape[-2:]) < 2 * RADIUS + 1:
        raise ValueError(f"images must be at least {2 * RADIUS + 1} pixels on each side")
    w = _window().to(x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w)  # "valid": exactly the pixels scikit-image averages

    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def ssim(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0
) -> np.ndarray:
    """Per-image SSIM of two equally shaped batches (or one image broadcast against a batch)."""
    x, y = torch.broadcast_tensors(_as_batch(a), _as_batch(b))
    return ssim_torch(x, y, data_range).numpy()


def psnr(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0
) -> np.ndarray:
    """Per-image peak signal-to-noise ratio in dB (capped at 100 dB for identical images)."""
    x, y = torch.broadcast_tensors(_as_batch(a), _as_batch(b))
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).clamp_min(data_range**2 * 1e-10)
    return (10 * torch.log10(data_range**2 / mse)).numpy()


def baseline_ssim(population: np.ndarray, victims: np.ndarray) -> np.ndarray:
    """SSIM of the population's mean crop against each victim: what knowing nobody scores."""
    mean = _as_batch(population).mean(dim=0, keepdim=True)
    return ssim(mean, victims)


def gallery_split(subjects: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, queries): one seeded photo per person with at least two, and their others."""
    rng = np.random.default_rng([seed, 0x6A1])
    gallery: list[int] = []
    queries: list[int] = []
    for person in np.unique(subjects):
        idx = np.flatnonzero(subjects == person)
        if len(idx) < 2:
            continue
        pick = int(rng.integers(len(idx)))
        gallery.append(int(idx[pick]))
        queries.extend(int(i) for i in np.delete(idx, pick))
    return np.asarray(gallery, dtype=np.int64), np.asarray(queries, dtype=np.int64)


def _standardise(images: np.ndarray | torch.Tensor) -> np.ndarray:
    v = _as_batch(images).flatten(1).numpy()
    v = v - v.mean(axis=1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def reidentify(
    queries: np.ndarray | torch.Tensor,
    query_people: np.ndarray,
    gallery: np.ndarray | torch.Tensor,
    gallery_people: np.ndarray,
) -> float:
    """Share of queries whose nearest gallery photo (pixel correlation) is the same person."""
    if len(query_people) == 0:
        raise ValueError("no queries to re-identify")
    sim = _standardise(queries) @ _standardise(gallery).T
    nearest = np.asarray(gallery_people)[sim.argmax(axis=1)]
    return float(np.mean(nearest == np.asarray(query_people)))
