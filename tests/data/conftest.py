"""Fixtures for the data tests: real photos shipped with scikit-image and matplotlib."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
import skimage.data

from splitfed.data.crop import CropConfig, EyeRegionCropper, default_face_model


def _astronaut() -> np.ndarray:
    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


def _grace_hopper() -> np.ndarray:
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    image = cv2.imread(path)
    assert image is not None, f"cannot read {path}"
    return image


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    return _astronaut()


@pytest.fixture(scope="session")
def grace_bgr() -> np.ndarray:
    return _grace_hopper()


@pytest.fixture(scope="session")
def face_photos() -> dict[str, np.ndarray]:
    return {"astronaut": _astronaut(), "grace_hopper": _grace_hopper()}


def require_face_model() -> Path:
    """The MediaPipe model, or a test failure that says how to get it (never a skip)."""
    model = default_face_model()
    if model is None:
        pytest.fail(
            "MediaPipe face model face_detection_short_range.tflite is missing: "
            "run `python scripts/fetch_face_model.py` once (it puts it in models/)"
        )
    return model


@pytest.fixture(scope="session")
def face_model() -> Path:
    """Fails (does not skip) when the MediaPipe model has not been fetched."""
    return require_face_model()


@pytest.fixture(scope="session")
def mp_cropper(face_model: Path):
    with EyeRegionCropper(CropConfig(detector="mediapipe")) as cropper:
        yield cropper


@pytest.fixture(scope="session")
def haar_cropper():
    with EyeRegionCropper(CropConfig(detector="haar")) as cropper:
        yield cropper


def _brighter(image: np.ndarray, delta: int) -> np.ndarray:
    return cv2.convertScaleAbs(image, alpha=1.0, beta=delta)


@pytest.fixture(scope="session")
def kdef_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small KDEF-like tree: 4 usable photos, 1 half-profile, 1 corrupt, 1 faceless, 1 README."""
    root = tmp_path_factory.mktemp("kdef") / "KDEF"
    ast, grace = _astronaut(), _grace_hopper()
    files = {
        "AF01/AF01AFS.JPG": ast,
        "AF01/AF01HAS.JPG": _brighter(ast, 20),
        "AM02/AM02ANS.JPG": grace,
        "BF01/BF01SUS.JPG": cv2.flip(_brighter(grace, -15), 1),
        "AF01/AF01HAHL.JPG": cv2.flip(ast, 1),  # half-left angle: excluded by default
        "AM02/AM02NES.JPG": np.full((400, 300, 3), 128, np.uint8),  # no face
    }
    for rel, image in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image)
    (root / "AM02" / "AM02DIS.JPG").write_bytes(b"this is not a JPEG" * 50)  # corrupt
    (root / "README.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder-per-class data set with synonym folder names and a subjects.csv."""
    root = tmp_path_factory.mktemp("folder") / "faces"
    ast, grace = _astronaut(), _grace_hopper()
    files = {
        "Fear/a.png": ast,
        "happiness/b.jpg": grace,
        "happiness/c.jpg": cv2.flip(ast, 1),
        "SAD/d.png": _brighter(grace, 10),
    }
    for rel, image in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image)
    (root / "subjects.csv").write_text(
        "file,subject\nFear/a.png,p1\nhappiness/b.jpg,p2\nhappiness/c.jpg,p1\nSAD/d.png,p2\n"
    )
    return root


@pytest.fixture
def fer_csv(tmp_path: Path) -> Path:
    """A FER2013-style CSV: 6 good rows of random pixels, 1 row with too few pixels."""
    rng = np.random.default_rng(7)
    lines = ["emotion,pixels,Usage"]
    for label, usage in [(0, "Training"), (1, "Training"), (2, "PublicTest"), (3, "Training"),
                         (5, "PrivateTest"), (6, "Training")]:  # fmt: skip
        pixels = " ".join(str(v) for v in rng.integers(0, 256, 48 * 48))
        lines.append(f"{label},{pixels},{usage}")
    lines.append("4,1 2 3,Training")
    path = tmp_path / "fer2013.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fer_folder(tmp_path: Path) -> Path:
    """FER2013's folder form (as on Kaggle): train/ and test/, each with a folder per emotion
    (Kaggle's names: fear, disgust, surprise...) of 48x48 gray faces; plus a stray class folder,
    a notes file among the pictures and a README at the top."""
    root = tmp_path / "fer2013"
    rng = np.random.default_rng(11)
    layout = {
        "train": {"angry": 3, "fear": 2, "happy": 4, "surprise": 1},
        "test": {"angry": 1, "happy": 2, "disgust": 1},
    }
    for split, classes in layout.items():
        for emotion, n in classes.items():
            folder = root / split / emotion
            folder.mkdir(parents=True)
            for i in range(n):
                face = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                assert cv2.imwrite(str(folder / f"{split[:2]}_{i:05d}.jpg"), face)
    (root / "train" / "contempt").mkdir()  # FER+ has it; this project's 7 classes do not
    assert cv2.imwrite(str(root / "train" / "contempt" / "x.png"), np.zeros((48, 48), np.uint8))
    (root / "train" / "happy" / "Thumbs.db").write_bytes(b"\0" * 64)
    (root / "README.md").write_text("FER2013, folder form\n")
    return root


def _shifted(image: np.ndarray, dx: int, dy: int, angle: float = 0.0) -> np.ndarray:
    """The photo moved (and turned by `angle` degrees): another camera's view of the scene."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


# (session+subject, photo, brightness) of the multi-view fixture: 4 people, 2 sittings of F01.
VIEW_PEOPLE = [("AF01", "ast", 0), ("BF01", "ast", 25), ("AM02", "grace", 0),
               ("AF03", "ast", -20), ("AM04", "grace", 20)]  # fmt: skip
VIEW_EMOTIONS = ("AN", "HA")
# Records missing from a view: no file at all, or a picture without a face.
VIEW_ABSENT = {("AM02", "HA", "HR")}
VIEW_FACELESS = {("AF03", "AN", "HL")}


@pytest.fixture(scope="session")
def kdef_views_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KDEF-named tree of real photos under three angle codes, as KDEF's five cameras shoot:
    S the photo, HL its mirror, HR a shifted and slightly turned copy; plus FL pictures (not a
    requested view), one faceless HL picture and one missing HR file."""
    root = tmp_path_factory.mktemp("kdef_views") / "KDEF"
    photos = {"ast": _astronaut(), "grace": _grace_hopper()}
    for who, photo, delta in VIEW_PEOPLE:
        for k, emo in enumerate(VIEW_EMOTIONS):
            base = _brighter(photos[photo], delta + 10 * k)
            views = {
                "S": base,
                "HL": cv2.flip(base, 1),
                "HR": _shifted(base, 12, -8, 4.0),
                "FL": _shifted(cv2.flip(base, 1), -10, 6),
            }
            for angle, image in views.items():
                if (who, emo, angle) in VIEW_ABSENT:
                    continue
                if (who, emo, angle) in VIEW_FACELESS:
                    image = np.full_like(image, 128)
                path = root / who / f"{who}{emo}{angle}.JPG"
                path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(path), image)
    return root


def _zoomed(image: np.ndarray, scale: float, dx: int) -> np.ndarray:
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, scale)
    m[0, 2] += dx
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def clip_frames(image: np.ndarray, n: int) -> list[np.ndarray]:
    """n frames of a slow zoom and pan over a real photo, brightening as it goes."""
    return [_brighter(_zoomed(image, 1.0 + 0.04 * t, 3 * t), 4 * t) for t in range(n)]


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder per class of clip folders (frames of real photos), a subjects.csv, a faceless
    clip, an empty clip folder and a stray file."""
    root = tmp_path_factory.mktemp("clips") / "ckplus"
    ast, grace = _astronaut(), _grace_hopper()
    clips = {
        "happy/c01": (ast, 5),
        "happy/c02": (grace, 7),
        "angry/c03": (cv2.flip(ast, 1), 6),
        "Sadness/c04": (_brighter(grace, 15), 5),
        "angry/c05": (_brighter(ast, -20), 12),
        "surprise/c06": (cv2.flip(grace, 1), 4),
        "happy/blank": (np.full_like(ast, 128), 4),  # no face: skipped
    }
    for rel, (image, n) in clips.items():
        folder = root / rel
        folder.mkdir(parents=True)
        for t, frame in enumerate(clip_frames(image, n)):
            assert cv2.imwrite(str(folder / f"frame_{t:03d}.png"), frame)
    (root / "angry" / "empty").mkdir()
    (root / "angry" / "notes.txt").write_text("not a clip\n")
    subjects = {"happy/c01": "p1", "happy/c02": "p2", "angry/c03": "p1", "Sadness/c04": "p2",
                "angry/c05": "p3", "surprise/c06": "p4", "happy/blank": "p3",
                "angry/empty": "p4"}  # fmt: skip
    (root / "subjects.csv").write_text(
        "file,subject\n" + "".join(f"{k},{v}\n" for k, v in subjects.items())
    )
    return root
