"""Eye-region crop: the band from the forehead to just below the eyes, levelled and resized.

The model only ever sees this band (eyes, brows, forehead), so the same crop must be made when a
data set is prepared and when the camera agent classifies a live frame. Faces are found with
MediaPipe's BlazeFace (short-range) when its model file is present, which also gives eye
keypoints, and otherwise with OpenCV's Haar cascades, which need no download.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from splitfed.errors import UserError

log = logging.getLogger(__name__)

MODEL_FILENAME = "face_detection_short_range.tflite"
FETCH_HINT = "python scripts/fetch_face_model.py"
_REPO_ROOT = Path(__file__).resolve().parents[2]

# Haar runs on frames scaled down to this longest side: faster, and the cascade's 24x24 window
# finds faces in camera frames and data-set photos alike at that size.
_HAAR_MAX_SIDE = 640
# Where the eyes sit in a Haar face box when the eye cascade does not find both.
_HAAR_EYE_Y = 0.38
_HAAR_EYE_X = (0.30, 0.70)

Backend = Literal["mediapipe", "haar"]


class CropConfig(BaseModel):
    """How eye-region crops are made; part of the data-set cache key, so any change re-crops."""

    model_config = ConfigDict(extra="forbid")

    height: int = Field(48, ge=8, le=1024, description="Crop height in pixels.")
    width: int = Field(96, ge=8, le=2048, description="Crop width in pixels (2:1 by default).")
    grayscale: bool = Field(
        True, description="One gray channel (True) or three RGB channels (False)."
    )
    detector: Literal["auto", "mediapipe", "haar"] = Field(
        "auto",
        description="Face detector: 'auto' uses MediaPipe when its model file is found, "
        "else OpenCV Haar cascades.",
    )
    face_model: Path | None = Field(
        None,
        description="BlazeFace short-range .tflite; default: $SPLITFED_FACE_MODEL, "
        "<repo>/models/, ~/.cache/splitfed/.",
    )
    min_confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="Minimum MediaPipe face score (Haar ignores it)."
    )
    above_eyes: float = Field(
        0.9,
        gt=0.0,
        le=3.0,
        description="Band top above the eye line, in inter-eye distances (brows + forehead).",
    )
    below_eyes: float = Field(
        0.35,
        ge=0.0,
        le=2.0,
        description="Band bottom below the eye line, in inter-eye distances.",
    )

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3


@dataclass(frozen=True)
class FaceDetection:
    """One face: its box and the two eye centres, in pixel coordinates of the input image."""

    box: tuple[int, int, int, int]  # x, y, w, h
    eyes: np.ndarray  # float64 (2, 2): (x, y) of the eye on the image's left, then its right
    score: float
    backend: Backend
    eyes_found: bool  # False when the eyes were estimated from the face box (Haar fallback)


def default_face_model() -> Path | None:
    """The first BlazeFace model file found in the default places, or None."""
    env = os.environ.get("SPLITFED_FACE_MODEL")
    candidates: list[Path] = []
    if env:
        env_path = Path(env).expanduser()
        if not env_path.is_file():
            log.warning("SPLITFED_FACE_MODEL=%s is not a file; looking elsewhere", env)
        candidates.append(env_path)
    candidates.append(_REPO_ROOT / "models" / MODEL_FILENAME)
    candidates.append(Path.home() / ".cache" / "splitfed" / MODEL_FILENAME)
    for path in candidates:
        if path.is_file():
            return path
    return None


def resolve_backend(config: CropConfig) -> tuple[Backend, Path | None]:
    """Which detector `config` gets, and its model file; cheap (creates nothing).

    Raises UserError when MediaPipe is asked for (or a model file named) but the file is missing.
    """
    if config.detector == "haar":
        return "haar", None
    if config.face_model is not None:
        model = config.face_model.expanduser()
        if not model.is_file():
            raise UserError(
                f"face model {model} not found; get it with: {FETCH_HINT} --dest {model}"
            )
        return "mediapipe", model
    model = default_face_model()
    if model is not None:
        return "mediapipe", model
    if config.detector == "mediapipe":
        raise UserError(
            f"MediaPipe face model {MODEL_FILENAME} not found (looked in $SPLITFED_FACE_MODEL, "
            f"{_REPO_ROOT / 'models'}, ~/.cache/splitfed); get it with: {FETCH_HINT}"
        )
    return "haar", None


def _level_transform(eyes: np.ndarray, config: CropConfig) -> tuple[np.ndarray, float, float]:
    """3x3 affine from image pixels to a levelled band of unit scale, and the band's size.

    The band is centred on the eyes' midpoint, `above_eyes` inter-eye distances above the eye
    line and `below_eyes` below it, as wide as the output's aspect ratio needs.
    """
    left, right = (eyes[0], eyes[1]) if eyes[0][0] <= eyes[1][0] else (eyes[1], eyes[0])
    dx, dy = float(right[0] - left[0]), float(right[1] - left[1])
    dist = math.hypot(dx, dy)
    cos, sin = dx / dist, dy / dist
    band_h = (config.above_eyes + config.below_eyes) * dist
    band_w = band_h * config.width / config.height
    mid_x, mid_y = (left + right) / 2.0
    # Rotate by minus the eye-line angle, then put the eyes' midpoint at the band's anchor.
    rot = np.array([[cos, sin], [-sin, cos]])
    anchor = np.array([band_w / 2.0, config.above_eyes * dist])
    shift = anchor - rot @ np.array([mid_x, mid_y])
    m = np.eye(3)
    m[:2, :2] = rot
    m[:2, 2] = shift
    return m, band_w, band_h


def crop_transform(eyes: np.ndarray, config: CropConfig) -> np.ndarray:
    """The 2x3 affine that maps input-image pixel coordinates to output-crop coordinates."""
    m, band_w, band_h = _level_transform(np.asarray(eyes, dtype=np.float64), config)
    return (_fit(band_w, band_h, config.width, config.height) @ m)[:2]


def _fit(band_w: float, band_h: float, out_w: int, out_h: int) -> np.ndarray:
    """3x3 scaling of the band's continuous extent onto `out_w` x `out_h` pixels.

    OpenCV puts pixel centres at integer coordinates, so the band's edges land on -0.5 and
    size - 0.5; that keeps the warp-then-resize path and the direct warp consistent.
    """
    return np.array([[out_w / band_w, 0.0, -0.5], [0.0, out_h / band_h, -0.5], [0.0, 0.0, 1.0]])


def map_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ transform[:, :2].T + transform[:, 2]


def _to_bgr(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    raise ValueError(f"expected a (H, W), (H, W, 3) or (H, W, 4) image, got {image.shape}")


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[:, :, 0]
    code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(image, code)


def _box_eyes(box: tuple[int, int, int, int]) -> np.ndarray:
    """Typical eye centres of a frontal face box, for when no eye points are available."""
    x, y, w, h = box
    ey = y + _HAAR_EYE_Y * h
    return np.array([[x + _HAAR_EYE_X[0] * w, ey], [x + _HAAR_EYE_X[1] * w, ey]], dtype=np.float64)


def _close_quietly(detector: Any) -> None:
    """Close a MediaPipe detector; at interpreter exit, at least silence its __del__.

    At exit MediaPipe's worker threads are already gone, so close() fails there and its
    __del__ would later print a traceback; dropping the handle stops that (the process is
    ending, the OS frees the rest).
    """
    if detector is None:
        return
    try:
        detector.close()
    except Exception:  # noqa: BLE001 - closing must never raise
        log.debug("closing the face detector failed", exc_info=True)
        try:
            detector._handle = None
        except AttributeError:
            pass


class EyeRegionCropper:
    """Finds the largest face in a BGR image and cuts out its eye region.

    Create it once and reuse it (per data set, or for all frames of a camera): the detector is
    loaded in the constructor. Close it (or use `with`) to release MediaPipe cleanly.
    """

    def __init__(self, config: CropConfig | None = None) -> None:
        self.config = config or CropConfig()
        backend, model = resolve_backend(self.config)
        self._mp_detector: Any = None
        self._face_cascade: cv2.CascadeClassifier | None = None
        self._eye_cascade: cv2.CascadeClassifier | None = None
        if backend == "mediapipe":
            assert model is not None
            try:
                self._mp_detector = self._create_mediapipe(model)
            except ImportError as exc:
                if self.config.detector == "mediapipe":
                    raise UserError(f"detector 'mediapipe' needs mediapipe: {exc}") from None
                log.warning("mediapipe is unusable (%s); using Haar cascades", exc)
                backend, model = "haar", None
        if backend == "haar":
            self._face_cascade = self._load_cascade("haarcascade_frontalface_default.xml")
            self._eye_cascade = self._load_cascade("haarcascade_eye.xml")
        self._backend: Backend = backend
        self.model_path = model
        # Close MediaPipe while the interpreter is still whole, even if nobody calls close().
        self._finalizer = weakref.finalize(self, _close_quietly, self._mp_detector)
        if backend == "mediapipe":
            log.info("face detector: MediaPipe BlazeFace (%s)", model)
        elif self.config.detector == "auto":
            log.info(
                "face detector: OpenCV Haar cascades (no MediaPipe model; %s gets it)", FETCH_HINT
            )
        else:
            log.info("face detector: OpenCV Haar cascades")

    def _create_mediapipe(self, model: Path) -> Any:
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.core.base_options import BaseOptions

        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(model)),
            min_detection_confidence=self.config.min_confidence,
        )
        try:
            return vision.FaceDetector.create_from_options(options)
        except (RuntimeError, ValueError) as exc:
            raise UserError(
                f"cannot load face model {model}: {exc}; re-fetch it with {FETCH_HINT} --force"
            ) from None

    @staticmethod
    def _load_cascade(name: str) -> cv2.CascadeClassifier:
        path = os.path.join(cv2.data.haarcascades, name)
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise UserError(
                f"OpenCV Haar cascade {path} is missing; reinstall opencv-contrib-python"
            )
        return cascade

    @property
    def backend(self) -> Backend:
        """'mediapipe' or 'haar': the detector actually in use."""
        return self._backend

    def close(self) -> None:
        """Release the MediaPipe detector (idempotent)."""
        self._finalizer()
        self._mp_detector = None

    def __enter__(self) -> EyeRegionCropper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- detection -------------------------------------------------------------------------------

    def detect(self, image_bgr: np.ndarray) -> FaceDetection | None:
        """The largest face with its eye centres, or None when there is no face."""
        if self._backend == "mediapipe":
            if self._mp_detector is None:
                raise RuntimeError("EyeRegionCropper is closed")
            return self._detect_mediapipe(_to_bgr(image_bgr))
        if image_bgr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {image_bgr.dtype}")
        return self._detect_haar(_to_gray(image_bgr))

    def _detect_mediapipe(self, bgr: np.ndarray) -> FaceDetection | None:
        import mediapipe as mp

        rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        result = self._mp_detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb))
        if not result.detections:
            return None
        h, w = bgr.shape[:2]

        def area(det: Any) -> int:
            return int(det.bounding_box.width) * int(det.bounding_box.height)

        det = max(result.detections, key=area)
        bb = det.bounding_box
        box = (int(bb.origin_x), int(bb.origin_y), int(bb.width), int(bb.height))
        score = float(det.categories[0].score) if det.categories else 1.0
        kps = det.keypoints or []
        if len(kps) >= 2:
            eyes = np.array([[kps[0].x * w, kps[0].y * h], [kps[1].x * w, kps[1].y * h]])
            eyes_found = True
        else:
            eyes, eyes_found = _box_eyes(box), False
        return self._finish(box, eyes, score, "mediapipe", eyes_found)

    def _detect_haar(self, gray: np.ndarray) -> FaceDetection | None:
        assert self._face_cascade is not None and self._eye_cascade is not None
        scale = min(1.0, _HAAR_MAX_SIDE / max(gray.shape[:2]))
        small = (
            gray
            if scale == 1.0
            else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        )
        small = cv2.equalizeHist(small)
        # Faces smaller than 1/8 of the frame are too far away for a usable eye crop anyway.
        min_face = max(30, min(small.shape[:2]) // 8)
        faces = self._face_cascade.detectMultiScale(
            small, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face)
        )
        if len(faces) == 0:
            return None
        x, y, w, h = (int(v) for v in max(faces, key=lambda f: int(f[2]) * int(f[3])))
        eyes_small = self._haar_eyes(small, (x, y, w, h))
        eyes_found = eyes_small is not None
        if eyes_small is None:
            eyes_small = _box_eyes((x, y, w, h))
        box = tuple(int(round(v / scale)) for v in (x, y, w, h))
        return self._finish(box, eyes_small / scale, 1.0, "haar", eyes_found)  # type: ignore[arg-type]

    def _haar_eyes(self, gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
        """Two plausible eyes in the face's upper part (one each side of its middle), or None."""
        assert self._eye_cascade is not None
        x, y, w, h = box
        roi = gray[y : y + int(0.6 * h), x : x + w]
        min_eye = max(8, w // 10)
        found = self._eye_cascade.detectMultiScale(
            roi,
            scaleFactor=1.1,
            minNeighbors=5,
            minSize=(min_eye, min_eye),
            maxSize=(w // 2, w // 2),
        )
        centres = [(ex + ew / 2.0, ey + eh / 2.0, float(ew)) for ex, ey, ew, eh in found]
        expected = _box_eyes((0, 0, w, h))
        best: tuple[float, np.ndarray] | None = None
        for i, a in enumerate(centres):
            for b in centres[i + 1 :]:
                left, right = (a, b) if a[0] <= b[0] else (b, a)
                dx, dy = right[0] - left[0], abs(right[1] - left[1])
                plausible = (
                    0.25 * w <= dx <= 0.65 * w
                    and dy <= 0.15 * w
                    and left[0] < 0.55 * w < right[0] + 0.1 * w
                    and left[0] < 0.5 * w
                    and right[0] > 0.5 * w
                    and max(left[2], right[2]) <= 1.6 * min(left[2], right[2])
                )
                if not plausible:
                    continue
                pts = np.array([[left[0], left[1]], [right[0], right[1]]])
                cost = float(np.linalg.norm(pts - expected))
                if best is None or cost < best[0]:
                    best = (cost, pts)
        if best is None:
            return None
        return best[1] + np.array([x, y], dtype=np.float64)

    @staticmethod
    def _finish(
        box: tuple[int, int, int, int],
        eyes: np.ndarray,
        score: float,
        backend: Backend,
        eyes_found: bool,
    ) -> FaceDetection | None:
        eyes = np.asarray(eyes, dtype=np.float64)
        if eyes[0, 0] > eyes[1, 0]:
            eyes = eyes[::-1].copy()
        if float(np.hypot(*(eyes[1] - eyes[0]))) < 2.0:
            return None  # too small to crop anything meaningful
        return FaceDetection(
            box=box, eyes=eyes, score=score, backend=backend, eyes_found=eyes_found
        )

    # -- cropping --------------------------------------------------------------------------------

    def transform(self, detection: FaceDetection) -> np.ndarray:
        """2x3 affine from input-image pixels to crop pixels for `detection`."""
        return crop_transform(detection.eyes, self.config)

    def crop_at(self, image_bgr: np.ndarray, detection: FaceDetection) -> np.ndarray:
        """The uint8 (C, H, W) eye-region crop around an already detected face."""
        cfg = self.config
        src = (
            _to_gray(image_bgr)
            if cfg.grayscale
            else cv2.cvtColor(_to_bgr(image_bgr), cv2.COLOR_BGR2RGB)
        )
        level, band_w, band_h = _level_transform(detection.eyes, cfg)
        if band_h <= cfg.height:
            # Small face: sample the output grid directly (bilinear upsampling).
            out = cv2.warpAffine(
                src, self.transform(detection), (cfg.width, cfg.height),
                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
            )  # fmt: skip
        else:
            # Large face: cut the band at native resolution, then shrink with area averaging,
            # which avoids the aliasing a direct down-sampling warp would give.
            bw, bh = max(1, round(band_w)), max(1, round(band_h))
            fit = _fit(band_w, band_h, bw, bh) @ level
            band = cv2.warpAffine(
                src, fit[:2], (bw, bh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
            out = cv2.resize(band, (cfg.width, cfg.height), interpolation=cv2.INTER_AREA)
        if out.ndim == 2:
            return out[None, :, :].copy()
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def crop_with_detection(
        self, image_bgr: np.ndarray
    ) -> tuple[np.ndarray | None, FaceDetection | None]:
        """Detect and crop in one go, also returning the detection (for overlays)."""
        detection = self.detect(image_bgr)
        if detection is None:
            return None, None
        return self.crop_at(image_bgr, detection), detection

    def crop(self, image_bgr: np.ndarray) -> np.ndarray | None:
        """The uint8 (C, H, W) eye-region crop of the largest face, or None without a face."""
        return self.crop_with_detection(image_bgr)[0]
