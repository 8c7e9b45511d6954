"""Camera jitter: each change does what it says by at most its maximum, from the batch seed.

The camera changes (tone curve, side light, blur, lower resolution, sensor noise, JPEG) are
drawn from the batch generator like every other augmentation, so every model copy that trains
on a batch sees the same pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from splitfed.config import CameraConfig, JitterConfig
from splitfed.data.batches import PIXEL_MEAN, PIXEL_STD, augment_batch, camera_jitter, to_tensor

H, W = 48, 96
# One change at a time: all maxima zero (or the identity; JPEG at its best) but the one tested.
NONE = CameraConfig(p=1.0, gamma=0.0, gradient=0.0, blur=0.0, lowres=1.0, noise=0.0, jpeg=95)


def crops(n: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 30, (n, H // 4, W // 4)).astype(np.float32)
    big = np.stack([cv2.resize(b, (W, H), interpolation=cv2.INTER_CUBIC) for b in base])
    return np.clip(big, 20, 235).astype(np.uint8)[:, None]


def grey(x: torch.Tensor) -> np.ndarray:
    """Normalised tensor back to grey levels."""
    return ((x * PIXEL_STD + PIXEL_MEAN) * 255.0).numpy().astype(np.float64)


def only(**change: float) -> CameraConfig:
    return NONE.model_copy(update=change)


def cam(x: torch.Tensor, cfg: CameraConfig, seed: int = 0) -> torch.Tensor:
    return camera_jitter(x.clone(), torch.Generator().manual_seed(seed), cfg)


def test_seeded_and_off_when_p_is_zero() -> None:
    x = to_tensor(crops())
    cfg = CameraConfig(p=0.5)
    assert torch.equal(cam(x, cfg), cam(x, cfg))
    assert not torch.equal(cam(x, cfg, 0), cam(x, cfg, 1))
    off = JitterConfig(camera=CameraConfig(p=0.0))
    on = JitterConfig(camera=cfg)
    assert not off.enabled and on.enabled and not on.geometric

    def aug(j: JitterConfig | None) -> torch.Tensor:
        return augment_batch(x.clone(), torch.Generator().manual_seed(3), jitter=j)

    assert torch.equal(aug(off), aug(None))  # p 0: the batches of no jitter at all
    assert not torch.equal(aug(on), aug(None))


def test_draws_do_not_depend_on_what_is_applied() -> None:
    """The generator ends in the same state whatever p is: later draws stay aligned."""
    x = to_tensor(crops())
    states = []
    for p in (0.1, 0.9):
        gen = torch.Generator().manual_seed(0)
        camera_jitter(x.clone(), gen, CameraConfig(p=p))
        states.append(torch.rand(4, generator=gen))
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=0)


def test_all_changes_at_their_least_is_nearly_the_identity() -> None:
    x = to_tensor(crops())
    err = np.abs(grey(cam(x, NONE)) - grey(x))  # JPEG at quality 95 remains
    assert err.mean() < 1.0 and err.max() <= 6.0


def test_noise_is_at_most_its_maximum() -> None:
    flat = torch.zeros(64, 1, H, W)  # mid-grey
    d = grey(cam(flat, only(noise=16.0))) - 128.0
    stds = d.std(axis=(1, 2, 3))
    assert stds.max() <= 16.5 and stds.max() >= 10 and stds.min() < 6  # drawn up to 16


def test_gamma_moves_mid_grey_both_ways() -> None:
    flat = torch.zeros(64, 1, H, W)
    g = grey(cam(flat, only(gamma=0.7)))[:, 0, 0, 0]
    lo, hi = 255 * 0.5 ** (2**0.7), 255 * 0.5 ** (2**-0.7)
    assert g.min() >= lo - 1 and g.max() <= hi + 1
    assert g.min() < 110 and g.max() > 146  # darker and brighter tone curves both drawn


def test_gradient_is_a_ramp_of_at_most_its_size() -> None:
    flat = torch.zeros(32, 1, H, W)
    g = grey(cam(flat, only(gradient=80.0)))
    spans = g.max(axis=(1, 2, 3)) - g.min(axis=(1, 2, 3))
    assert spans.max() <= 80.5 and spans.max() > 50
    np.testing.assert_allclose(g.mean(axis=(1, 2, 3)), 128.0, atol=1.0)  # light, not exposure


def test_blur_and_lowres_lose_detail_jpeg_leaves_blocks() -> None:
    checker = np.broadcast_to(
        ((np.indices((H, W)).sum(0) % 2) * 200 + 28).astype(np.uint8), (16, 1, H, W)
    )
    x = to_tensor(checker.copy())

    def detail(g: np.ndarray) -> np.ndarray:
        return np.array([cv2.Laplacian(i[0], cv2.CV_64F).var() for i in g])

    base = detail(grey(x))
    for name, change in (("blur", {"blur": 1.4}), ("lowres", {"lowres": 3.0})):
        d = detail(grey(cam(x, only(**change)))) / base
        assert np.median(d) < 0.3, name
    textured = to_tensor(crops(16))
    out = grey(cam(textured, only(jpeg=20)))
    np.testing.assert_allclose(out, np.rint(out), atol=1e-3)  # decoded pixels are whole levels
    err = np.abs(out - grey(textured)).mean(axis=(1, 2, 3))
    assert (err > 0.3).all()


def test_changed_crops_saturate_like_a_sensor() -> None:
    x = to_tensor(crops()) * 3.0  # far past white and black after a strong contrast change
    g = grey(cam(x, CameraConfig(p=1.0)))
    assert g.min() >= -1e-3 and g.max() <= 255.0 + 1e-3


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_shape_and_dtype(p: float) -> None:
    x = to_tensor(crops(5))
    y = cam(x, CameraConfig(p=p))
    assert y.shape == x.shape and y.dtype == torch.float32
