"""The domain-shift proxy, per-crop normalisation and geometric jitter.

Each perturbation does what its name says, by the amount documented, from a seed; it applies to
real photos too, where the face detector still finds the face and the band follows the face.
Per-crop normalisation makes the client half blind to exposure and contrast; jitter is seeded
and leaves the split arithmetic unchanged.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from splitfed.config import CameraConfig, JitterConfig, TrainConfig
from splitfed.data.batches import augment_batch, to_tensor
from splitfed.data.crop import EyeRegionCropper
from splitfed.data.shift import (
    BAND_OFFSET,
    BAND_SCALE,
    GEOMETRIC,
    PERTURBATIONS,
    PHOTOMETRIC,
    other_camera,
    shift_metrics,
    shift_set,
)
from splitfed.model import ModelConfig, build_split_model
from splitfed.simulate import SimSpec, simulate

H, W = 48, 96


def crops(n: int = 6, seed: int = 0) -> np.ndarray:
    """Textured uint8 crops, mid-grey on average, with room to brighten and darken."""
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 30, (n, 1, H // 4, W // 4)).astype(np.float32)
    big = np.stack([cv2.resize(b[0], (W, H), interpolation=cv2.INTER_CUBIC) for b in base])
    return np.clip(big, 20, 235).astype(np.uint8)[:, None]


def row_peak(images: np.ndarray) -> np.ndarray:
    """Row of the brightest horizontal line of each image."""
    return images[:, 0].astype(np.float64).mean(axis=2).argmax(axis=1)


@pytest.mark.parametrize("name", [*PERTURBATIONS, "other_camera"])
def test_seeded_shape_preserving_and_changing(name: str) -> None:
    x = crops()
    a, b = shift_set(x, name, seed=1), shift_set(x, name, seed=1)
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert (a != x).any(axis=(1, 2, 3)).all(), "every picture must change"
    np.testing.assert_array_equal(x, crops())  # the input is not changed in place


@pytest.mark.parametrize("name", [n for n in PERTURBATIONS if n != "jpeg"])
def test_strength_zero_is_the_identity(name: str) -> None:
    x = crops()
    np.testing.assert_array_equal(PERTURBATIONS[name](x, np.random.default_rng(0), 0.0), x)


def test_random_perturbations_depend_on_the_seed() -> None:
    x = crops()
    for name in ("noise", "roll", "gamma", "gradient", "exposure", "other_camera"):
        assert not np.array_equal(shift_set(x, name, seed=1), shift_set(x, name, seed=2)), name


def test_band_offsets_move_the_eye_line() -> None:
    x = np.full((1, 1, H, W), 60, np.uint8)
    x[:, :, 24, :] = 250  # the eye line
    lower = PERTURBATIONS["band_lower"](x, np.random.default_rng(0), 1.0)
    higher = PERTURBATIONS["band_higher"](x, np.random.default_rng(0), 1.0)
    step = BAND_OFFSET * H
    assert abs(row_peak(lower)[0] - (24 - step)) <= 0.6  # a lower band: the eyes land higher
    assert abs(row_peak(higher)[0] - (24 + step)) <= 0.6


def test_tighter_and_looser_scale_about_the_centre() -> None:
    x = np.full((1, 1, H, W), 60, np.uint8)
    x[:, :, :, [27, 67]] = 250  # two eyes 40 pixels apart about the centre (47.5)
    for name, zoom in (("tighter", 1 + BAND_SCALE), ("looser", 1 / (1 + BAND_SCALE))):
        out = PERTURBATIONS[name](x, np.random.default_rng(0), 1.0)[0, 0].mean(axis=0)
        left, right = np.argmax(out[:48]), 48 + np.argmax(out[48:])
        assert abs((right - left) - 40 * zoom) <= 1.5, name
        assert abs((left + right) / 2 - 47) <= 1.0, name


def test_roll_tilts_a_level_line() -> None:
    x = np.full((4, 1, H, W), 60, np.uint8)
    x[:, :, 24, :] = 250
    out = PERTURBATIONS["roll"](x, np.random.default_rng(3), 1.0)
    left = out[:, 0, :, 20].argmax(axis=1).astype(int)
    right = out[:, 0, :, 75].argmax(axis=1).astype(int)
    tilt = np.degrees(np.arctan2(np.abs(left - right), 55))
    assert np.all(np.abs(tilt - 10) <= 2)


def test_photometric_amounts() -> None:
    rng = np.random.default_rng(0)
    flat = np.full((8, 1, H, W), 128, np.uint8)
    d = PERTURBATIONS["noise"](flat, rng, 1.0).astype(float) - 128
    assert 18 <= d.std() <= 22
    ramp = PERTURBATIONS["gradient"](flat, rng, 1.0).astype(float)
    spans = ramp.max(axis=(1, 2, 3)) - ramp.min(axis=(1, 2, 3))
    assert np.allclose(spans, 100, atol=1) and abs(ramp.mean() - 128) < 2
    g = PERTURBATIONS["gamma"](flat, rng, 1.0)[:, 0, 0, 0]
    assert set(g.tolist()) <= {64, 181} and len(set(g.tolist())) == 2
    two = np.where(np.arange(W) < W // 2, 28, 228).astype(np.uint8)[None, None, None].repeat(8, 0)
    two = np.broadcast_to(two, (8, 1, H, W)).copy()
    e = PERTURBATIONS["exposure"](two, rng, 1.0).astype(float)
    assert np.allclose(e.max(axis=(1, 2, 3)) - e.min(axis=(1, 2, 3)), 100, atol=1)
    assert set(np.round(e.mean(axis=(1, 2, 3)) - 128).tolist()) == {-40.0, 40.0}


def test_blur_lowres_jpeg_lose_detail() -> None:
    x = crops()
    checker = ((np.indices((H, W)).sum(0) % 2) * 200 + 28).astype(np.uint8)[None, None]

    def detail(im: np.ndarray) -> float:
        return float(np.mean([cv2.Laplacian(i[0].astype(np.float64), -1).var() for i in im]))

    for name in ("blur", "lowres"):
        assert detail(PERTURBATIONS[name](checker, None, 1.0)) < 0.05 * detail(checker), name  # type: ignore[arg-type]
    err_hi = np.abs(PERTURBATIONS["jpeg"](x, None, 1.0).astype(float) - x).mean()  # type: ignore[arg-type]
    err_lo = np.abs(PERTURBATIONS["jpeg"](x, None, 0.0).astype(float) - x).mean()  # type: ignore[arg-type]
    assert err_hi > 2 * err_lo > 0


def test_other_camera_mixes_geometry_and_photometry() -> None:
    x = crops(40)
    out = other_camera(x, np.random.default_rng(0), 1.0)
    assert (np.abs(out.astype(float) - x).mean(axis=(1, 2, 3)) > 1).all()
    assert set(GEOMETRIC) | set(PHOTOMETRIC) == set(PERTURBATIONS)


# ---- on real photos: the detector still finds the face, the band follows it ------------------


def _photo_batch(bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bgr.transpose(2, 0, 1))[None]


def _eyes(cropper: EyeRegionCropper, bgr_chw: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(bgr_chw[0].transpose(1, 2, 0))
    det = cropper.detect(image)
    assert det is not None, "no face found"
    crop = cropper.crop_at(image, det)
    assert crop.std() > 10, "the crop is flat"
    return det.eyes


@pytest.mark.parametrize("photo", ["astronaut", "grace_hopper"])
def test_photos_stay_croppable_and_the_band_follows(mp_cropper, face_photos, photo) -> None:
    x = _photo_batch(face_photos[photo])
    h = x.shape[2]
    eyes = _eyes(mp_cropper, x)
    spacing = float(np.linalg.norm(eyes[1] - eyes[0]))
    rng = np.random.default_rng(0)
    for name, fn in PHOTOMETRIC.items():
        got = _eyes(mp_cropper, fn(x, rng, 1.0))
        assert np.abs(got - eyes).max() < 0.15 * spacing, name
    # A detector that returns the band 7 % of the picture lower sees the eyes 7 % higher.
    for name, sign in (("band_lower", -1), ("band_higher", 1)):
        got = _eyes(mp_cropper, GEOMETRIC[name](x, rng, 0.5))
        moved = (got - eyes).mean(axis=0)  # of the eyes' midpoint: keypoints jitter a little
        assert abs(moved[1] - sign * 0.5 * BAND_OFFSET * h) < 0.15 * spacing, name
        assert abs(moved[0]) < 0.15 * spacing, name
    tight = _eyes(mp_cropper, GEOMETRIC["tighter"](x, rng, 0.5))
    ratio = float(np.linalg.norm(tight[1] - tight[0])) / spacing
    assert abs(ratio - (1 + 0.5 * BAND_SCALE)) < 0.08


# ---- per-crop normalisation ------------------------------------------------------------------


def test_per_crop_norm_ignores_brightness_and_contrast() -> None:
    cfg = ModelConfig(input_norm="per-crop", widths=(8, 16, 16), cut=2)
    client, _ = build_split_model(cfg, seed=0)
    glob, _ = build_split_model(cfg.model_copy(update={"input_norm": "global"}), seed=0)
    client.eval()
    glob.eval()
    x = to_tensor(crops())
    y = x * 0.4 + 0.8  # darker contrast, brighter
    with torch.no_grad():
        torch.testing.assert_close(client(y), client(x), rtol=0, atol=1e-4)
        assert (
            glob(y) - glob(x)
        ).abs().max() > 1e-2  # without it the output moves (100x the tolerance)
    # No parameters: both halves load each other's weights, and share a seeded start.
    assert client.state_dict().keys() == glob.state_dict().keys()
    for k, v in client.state_dict().items():
        torch.testing.assert_close(v, glob.state_dict()[k])


def test_global_norm_is_the_plain_network() -> None:
    client, _ = build_split_model(ModelConfig(input_norm="global"), seed=0)
    x = to_tensor(crops())
    client.eval()
    with torch.no_grad():
        assert torch.equal(client(x), client.blocks(x))


def test_shift_metrics_of_a_model() -> None:
    from splitfed.data.dataset import EmotionDataset

    client, server = build_split_model(ModelConfig(widths=(8, 16, 16), cut=1), seed=0)

    class Halves:
        client_net, server_net = client, server

    images = crops(14)
    ds = EmotionDataset("t", images, np.arange(14, dtype=np.int64) % 7, None, {})
    m = shift_metrics(Halves(), ds, seed=0)
    assert set(m["shift_by_perturbation"]) == set(PERTURBATIONS)
    assert 0 <= m["shift_accuracy"] <= 1 and 0 <= m["in_domain_accuracy"] <= 1
    assert m["shift_gap"] == pytest.approx(m["in_domain_accuracy"] - m["shift_accuracy"])
    assert client.training and server.training  # modes restored
    assert shift_metrics(object(), ds) == {}


# ---- geometric jitter ------------------------------------------------------------------------


def test_jitter_is_seeded_and_only_the_camera_is_on_by_default() -> None:
    x = to_tensor(crops())
    off = JitterConfig(camera=CameraConfig(p=0.0))
    jit = off.model_copy(update={"scale": 0.2, "rotation": 8.0, "shift_y": 0.12})
    default = TrainConfig().jitter  # the input recipe: camera on, geometry off
    assert default.camera.enabled and not default.geometric and not off.enabled
    assert default == off.model_copy(update={"camera": CameraConfig()})

    def aug(j: JitterConfig | None, seed: int = 5) -> torch.Tensor:
        return augment_batch(x.clone(), torch.Generator().manual_seed(seed), jitter=j)

    assert torch.equal(aug(jit), aug(jit))
    assert not torch.equal(aug(jit), aug(jit, 6))
    assert torch.equal(aug(None), aug(off))  # zero jitter: the plain batches
    assert not torch.equal(aug(jit), aug(None))
    assert TrainConfig().jitter == TrainConfig.model_validate(TrainConfig().model_dump()).jitter


def test_jitter_moves_the_band_by_at_most_its_range() -> None:
    x = torch.full((64, 1, H, W), -1.0)
    x[:, :, 24, :] = 2.0
    jit = JitterConfig(shift_y=0.12, camera=CameraConfig(p=0.0))
    # Draw with the jitter alone: skip the flips/shifts by comparing with the unjittered batch.
    gen = torch.Generator().manual_seed(0)
    plain = augment_batch(x.clone(), gen)
    gen = torch.Generator().manual_seed(0)
    moved = augment_batch(x.clone(), gen, jitter=jit)
    p = plain[:, 0].mean(-1).argmax(-1).float()
    m = moved[:, 0].mean(-1).argmax(-1).float()
    d = (m - p).abs()
    assert d.max() <= 0.12 * H + 1 and d.max() >= 0.06 * H


@pytest.mark.parametrize("algo", ["sl", "sflv1"])
def test_jitter_camera_and_per_crop_keep_split_equal_to_centralized(small_synth, algo: str) -> None:
    jitter = JitterConfig(scale=0.2, rotation=8, shift_y=0.1, camera=CameraConfig(p=0.5))

    def run(name: str) -> dict:  # type: ignore[type-arg]
        spec = SimSpec(
            name,
            1,
            2,
            seed=7,
            train=TrainConfig(batch_size=16, jitter=jitter),
            model=ModelConfig(widths=(8, 16, 16), cut=1, input_norm="per-crop"),
        )
        return simulate(small_synth, spec)

    central, split = run("centralized"), run(algo)
    traj = [[(r["train_loss"], r["test_accuracy"]) for r in m["rounds"]] for m in (central, split)]
    np.testing.assert_allclose(traj[1], traj[0], rtol=0, atol=1e-6)
    assert central["rounds"][-1]["train_loss"] < central["rounds"][0]["train_loss"]
