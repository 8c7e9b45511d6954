"""Eye-region crop on real photos, with MediaPipe and with Haar cascades."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from splitfed.data import crop as crop_mod
from splitfed.data.crop import (
    CropConfig,
    EyeRegionCropper,
    FaceDetection,
    crop_transform,
    map_points,
    resolve_backend,
)
from splitfed.errors import UserError

PHOTOS = ["astronaut", "grace_hopper"]


def _assert_eye_band(cropper: EyeRegionCropper, det: FaceDetection, eyes: np.ndarray) -> None:
    """`eyes` (image pixels) land in the crop's eye band, with room above for brows/forehead."""
    h, w = cropper.config.height, cropper.config.width
    pts = map_points(cropper.transform(det), eyes)
    left, right = pts[np.argsort(pts[:, 0])]
    for x, y in (left, right):
        assert 0.50 * h <= y <= 0.85 * h, f"eye y {y:.1f} outside 50..85% of {h}"
        assert 0.05 * w <= x <= 0.95 * w, f"eye x {x:.1f} outside the crop width {w}"
    assert left[0] < 0.5 * w < right[0]


def _check_crop(cropper: EyeRegionCropper, image: np.ndarray) -> None:
    out, det = cropper.crop_with_detection(image)
    assert det is not None and out is not None, f"no face found by {cropper.backend}"
    assert out.shape == (1, 48, 96) and out.dtype == np.uint8
    assert out.std() > 10, "crop is flat: it missed the face"
    _assert_eye_band(cropper, det, det.eyes)
    # The crop is exactly what detect() + crop_at() give (same transform).
    np.testing.assert_array_equal(cropper.crop(image), out)


@pytest.mark.parametrize("photo", PHOTOS)
def test_mediapipe_crop_holds_eyes_and_brows(mp_cropper, face_photos, photo) -> None:
    assert mp_cropper.backend == "mediapipe"
    _check_crop(mp_cropper, face_photos[photo])
    det = mp_cropper.detect(face_photos[photo])
    assert det is not None and det.eyes_found and 0.5 <= det.score <= 1.0


@pytest.mark.parametrize("photo", PHOTOS)
def test_haar_crop_holds_eyes_and_brows(haar_cropper, face_photos, photo) -> None:
    assert haar_cropper.backend == "haar"
    _check_crop(haar_cropper, face_photos[photo])


@pytest.mark.parametrize("photo", PHOTOS)
def test_haar_crop_contains_the_eyes_mediapipe_finds(haar_cropper, mp_cropper, face_photos, photo):
    """Haar's eyes may be estimated from the face box; MediaPipe's keypoints must still fit."""
    image = face_photos[photo]
    haar_det = haar_cropper.detect(image)
    mp_det = mp_cropper.detect(image)
    assert haar_det is not None and mp_det is not None
    _assert_eye_band(haar_cropper, haar_det, mp_det.eyes)


def test_tilted_face_is_levelled(mp_cropper, grace_bgr) -> None:
    h, w = grace_bgr.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), 15, 1.0)
    tilted = cv2.warpAffine(grace_bgr, rot, (w, h), borderMode=cv2.BORDER_REPLICATE)
    det = mp_cropper.detect(tilted)
    assert det is not None
    angle = np.degrees(np.arctan2(*(det.eyes[1] - det.eyes[0])[::-1]))
    assert abs(angle) > 8, "the test image should really be tilted"
    eyes_in_crop = map_points(mp_cropper.transform(det), det.eyes)
    assert abs(eyes_in_crop[0, 1] - eyes_in_crop[1, 1]) < 1e-6
    straight = mp_cropper.crop(grace_bgr).astype(float)
    levelled = mp_cropper.crop(tilted).astype(float)
    corr = np.corrcoef(straight.ravel(), levelled.ravel())[0, 1]
    assert corr > 0.8, f"levelled crop differs from the upright one (corr {corr:.2f})"


@pytest.mark.parametrize("backend", ["mediapipe", "haar"])
@pytest.mark.parametrize(
    "image",
    [
        np.full((240, 320, 3), 128, np.uint8),
        np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8),
    ],
    ids=["gray", "noise"],
)
def test_no_face_gives_none(backend, image, request) -> None:
    cropper = request.getfixturevalue("mp_cropper" if backend == "mediapipe" else "haar_cropper")
    assert cropper.detect(image) is None
    assert cropper.crop(image) is None


def test_colour_and_size_options(face_model, astronaut_bgr) -> None:
    with EyeRegionCropper(CropConfig(grayscale=False, height=32, width=64)) as cropper:
        out = cropper.crop(astronaut_bgr)
    assert out is not None and out.shape == (3, 32, 64) and out.dtype == np.uint8
    # RGB order: the astronaut's red flag/skin make channel 0 brighter than channel 2 on average.
    assert out[0].mean() > out[2].mean()


def test_accepts_grayscale_input(haar_cropper, mp_cropper, astronaut_bgr) -> None:
    gray = cv2.cvtColor(astronaut_bgr, cv2.COLOR_BGR2GRAY)
    for cropper in (haar_cropper, mp_cropper):
        out = cropper.crop(gray)
        assert out is not None and out.shape == (1, 48, 96)


def test_crop_transform_puts_eyes_at_fixed_places() -> None:
    cfg = CropConfig()
    eyes = np.array([[100.0, 200.0], [160.0, 210.0]])
    pts = map_points(crop_transform(eyes, cfg), eyes)
    # Level, symmetric about the centre, at above/(above+below) of the height.
    assert pts[0, 1] == pytest.approx(pts[1, 1])
    assert (pts[0, 0] + pts[1, 0]) / 2 == pytest.approx(cfg.width / 2 - 0.5)
    expected_y = cfg.height * cfg.above_eyes / (cfg.above_eyes + cfg.below_eyes) - 0.5
    assert pts[0, 1] == pytest.approx(expected_y)
    # Eye order does not matter.
    np.testing.assert_allclose(crop_transform(eyes[::-1], cfg), crop_transform(eyes, cfg))


def test_missing_model_with_mediapipe_is_a_user_error(monkeypatch, tmp_path) -> None:
    missing = tmp_path / "nope.tflite"
    with pytest.raises(UserError, match="fetch_face_model.py"):
        EyeRegionCropper(CropConfig(detector="mediapipe", face_model=missing))
    monkeypatch.setattr(crop_mod, "default_face_model", lambda: None)
    with pytest.raises(UserError, match=r"face_detection_short_range\.tflite.*fetch_face_model"):
        resolve_backend(CropConfig(detector="mediapipe"))


def test_auto_falls_back_to_haar_and_logs_it(monkeypatch, caplog) -> None:
    monkeypatch.setattr(crop_mod, "default_face_model", lambda: None)
    with caplog.at_level(logging.INFO, logger="splitfed.data.crop"):
        with EyeRegionCropper(CropConfig(detector="auto")) as cropper:
            assert cropper.backend == "haar"
    assert "Haar" in caplog.text


def test_auto_uses_mediapipe_when_model_present(face_model) -> None:
    with EyeRegionCropper() as cropper:
        assert cropper.backend == "mediapipe"
        cropper.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        cropper.detect(np.zeros((10, 10, 3), np.uint8))


def test_env_var_model_path(face_model, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPLITFED_FACE_MODEL", str(face_model))
    assert crop_mod.default_face_model() == face_model
    monkeypatch.setenv("SPLITFED_FACE_MODEL", str(tmp_path / "missing.tflite"))
    assert crop_mod.default_face_model() != tmp_path / "missing.tflite"


def test_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError):
        CropConfig(heigth=48)  # type: ignore[call-arg]
