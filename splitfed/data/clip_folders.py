"""Real clips for FedSL: a folder per class of clips, each a folder of frames or a video file.

    <root>/<emotion>/<clip>/frame_000.png, frame_001.png, ...   (CK+ style: neutral -> peak)
    <root>/<emotion>/<clip>.mp4 | .avi | .mov | .mkv | .webm     (read with cv2.VideoCapture)
    <root>/subjects.csv                                          (optional: file,subject)

`subjects.csv` names each clip by its path under the root (`happy/clip01` or
`happy/clip01.mp4`) and gives its person, so the split keeps test people out of training, as
the folder loader does. Each clip is resampled to `frames` frames spread evenly from its first
to its last, and every frame is eye-cropped on the path every picture takes (`EyeRegionCropper`).
A clip with an unreadable frame, or a frame without a face, is skipped and counted.

Frames are ordered by the numbers in their names (frame_2 before frame_10), then by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from splitfed.data.clips import ClipDataset
from splitfed.data.crop import CropConfig, EyeRegionCropper, resolve_backend
from splitfed.data.dataset import EmotionDataset
from splitfed.data.loaders import (
    IMAGE_EXTENSIONS,
    _as_crop,
    _class_folders,
    _Problems,
    _progress,
    _read_subjects_csv,
    default_cache_dir,
    read_image,
    save_cache_file,
)
from splitfed.emotions import emotion_index
from splitfed.errors import UserError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})
CLIP_PROBLEMS = ("unreadable", "no_face", "unknown_class", "not_image")
CLIPS_CACHE_VERSION = 1


@dataclass
class ClipItem:
    """One clip: a folder of frames or a video file, with its class and person."""

    path: Path
    rel: str
    label: int
    subject: str | None
    video: bool


def _visible(d: Path) -> list[Path]:
    return sorted(e for e in d.iterdir() if not e.name.startswith("."))


def is_clip_root(root: Path) -> bool:
    """Whether `root` is recognisably a set of clips: class folders holding video files and no
    loose stills.

    Folders of frames are not recognised on their own: a class folder of per-person subfolders
    of photos is an ordinary folder-per-class set (read recursively), and guessing "clips" there
    would silently keep one picture per person. Frame folders load with `--data-format clips`.
    """
    if not root.is_dir():
        return False
    saw_video = False
    for d in _visible(root):
        if not d.is_dir() or emotion_index(d.name) is None:
            continue
        for e in _visible(d):
            if e.is_file() and e.suffix.lower() in VIDEO_EXTENSIONS:
                saw_video = True
            elif e.suffix.lower() in IMAGE_EXTENSIONS:
                return False  # pictures straight in a class folder: the folder format
    return saw_video


def _natural_key(path: Path) -> tuple[object, ...]:
    parts = re.split(r"(\d+)", path.name)
    return tuple(int(p) if p.isdigit() else p.lower() for p in parts), path.name


def frame_files(clip: Path) -> list[Path]:
    """The frames of a clip folder in order."""
    files = [f for f in _visible(clip) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=_natural_key)


def list_clips(root: Path, problems: _Problems) -> tuple[list[ClipItem], bool]:
    """Clips of every emotion folder, and whether subjects.csv gave their people."""
    classes = _class_folders(root, root, problems)
    if not classes:
        raise UserError(f"{root}: no class folders of clips (one subfolder per emotion expected)")
    subjects_csv = root / "subjects.csv"
    subjects = _read_subjects_csv(subjects_csv) if subjects_csv.is_file() else None
    items: list[ClipItem] = []
    for d, label in classes:
        for e in _visible(d):
            rel = e.relative_to(root).as_posix()
            video = e.is_file() and e.suffix.lower() in VIDEO_EXTENSIONS
            if not (e.is_dir() or video):
                problems.add("not_image", rel)
                continue
            subject = None if subjects is None else subjects.get(rel)
            items.append(ClipItem(e, rel, label, subject, video))
    return items, subjects is not None


def frame_positions(n: int, frames: int) -> np.ndarray:
    """`frames` indices spread evenly over n frames, first and last included."""
    if n < 1:
        raise ValueError("a clip needs at least one frame")
    return np.linspace(0, n - 1, frames).round().astype(np.int64)


def _read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out: list[np.ndarray] = []
    try:
        while cap.isOpened():
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            out.append(frame)
    finally:
        cap.release()
    return out


def read_clip(item: ClipItem, frames: int) -> list[np.ndarray] | None:
    """`frames` BGR frames of the clip spread evenly over it; None if a frame is unreadable."""
    if item.video:
        video = _read_video(item.path)
        if not video:
            return None
        return [video[i] for i in frame_positions(len(video), frames)]
    files = frame_files(item.path)
    if not files:
        return None
    picked = [read_image(files[i]) for i in frame_positions(len(files), frames)]
    if any(f is None for f in picked):
        return None
    return picked  # type: ignore[return-value]


def _crop_frame(
    cropper: EyeRegionCropper, frame: np.ndarray, crop: CropConfig
) -> np.ndarray | None:
    if frame.shape[:2] == (crop.height, crop.width):
        return _as_crop(frame, crop)  # already an eye crop at this size
    return cropper.crop(frame)


def _cache_file(
    root: Path, items: list[ClipItem], frames: int, crop: CropConfig, cache_dir: Path | None
) -> Path:
    """Named by what decides the crops: the files (names, sizes, mtimes), frames, crop, detector."""
    files: list[tuple[str, int, int]] = []
    for it in items:
        for f in [it.path] if it.video else frame_files(it.path):
            st = f.stat()
            files.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    if (root / "subjects.csv").is_file():
        st = (root / "subjects.csv").stat()
        files.append(("subjects.csv", st.st_size, st.st_mtime_ns))
    backend, model = resolve_backend(crop)
    payload = {
        "v": CLIPS_CACHE_VERSION,
        "root": str(root.resolve()),
        "files": sorted(files),
        "frames": frames,
        "crop": json.loads(crop.model_dump_json()),
        "backend": backend,
        "model": str(model) if model else None,
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    return (cache_dir or default_cache_dir()) / f"clipdir-{root.name}-{key}.npz"


def _read_cache(path: Path) -> ClipDataset | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            head = json.loads(str(npz["meta_json"]))
            subjects = npz["subjects"] if "subjects" in npz.files else None
            ds = ClipDataset(head["name"], npz["clips"], npz["labels"], subjects, head["meta"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable clip cache %s: %s", path, e)
        return None
    ds.meta["cache_hit"] = True
    return ds


def _write_cache(path: Path, ds: ClipDataset) -> None:
    arrays: dict[str, np.ndarray] = {"clips": ds.clips, "labels": ds.labels}
    if ds.subjects is not None:
        arrays["subjects"] = ds.subjects.astype(str)
    arrays["meta_json"] = np.array(json.dumps({"name": ds.name, "meta": ds.meta}))
    save_cache_file(path, arrays, "clip")


def load_clips(
    path: str | Path,
    frames: int,
    crop: CropConfig | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> ClipDataset:
    """Every clip under `path` as `frames` eye crops, neutral first; the type FedSL trains on.

    `meta` counts the clips skipped (unreadable, a frame without a face) with a few names."""
    if frames < 2:
        raise UserError(f"clips need at least 2 frames, got {frames}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"no such folder of clips: {root}")
    crop = crop or CropConfig()
    problems = _Problems()
    items, has_subjects = list_clips(root, problems)
    cache = _cache_file(root, items, frames, crop, cache_dir) if use_cache else None
    if cache is not None and cache.is_file():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    clips: list[np.ndarray] = []
    kept: list[ClipItem] = []
    with EyeRegionCropper(crop) as cropper, _progress(progress, len(items), "clips") as bar:
        for item in items:
            raw = read_clip(item, frames)
            if raw is None:
                problems.add("unreadable", item.rel)
            else:
                crops = [_crop_frame(cropper, f, crop) for f in raw]
                if any(c is None for c in crops):
                    problems.add("no_face", item.rel)
                else:
                    clips.append(np.stack(crops))  # type: ignore[arg-type]
                    kept.append(item)
            bar.advance()
        backend = cropper.backend
    for kind in ("unreadable", "no_face"):
        n = problems.counts.get(kind, 0)
        if n:
            log.warning(
                "%s: %d clip(s) skipped (%s): %s",
                root,
                n,
                "unreadable" if kind == "unreadable" else "a frame without a face",
                ", ".join(problems.examples[kind][:5]),
            )
    if not kept:
        raise UserError(f"no usable clips in {root}: {problems.counts or 'none found'}")
    if has_subjects:
        missing = [it.rel for it in kept if not it.subject]
        if missing:
            raise UserError(
                f"{root / 'subjects.csv'} has no subject for {len(missing)} clip(s), "
                f"e.g. {', '.join(missing[:3])}"
            )
    meta: dict[str, object] = {
        "format": "clips",
        "source": str(root.resolve()),
        "crop": json.loads(crop.model_dump_json()),
        "backend": backend,
        "sequence": f"clips of {frames} frames",
        "clips_seen": len(items),
        "clip_files": [it.rel for it in kept],
        **problems.to_meta(CLIP_PROBLEMS),
        "cache_hit": False,
    }
    ds = ClipDataset(
        f"clips:{root.name}",
        np.stack(clips).astype(np.uint8),
        np.asarray([it.label for it in kept], dtype=np.int64),
        np.asarray([it.subject for it in kept], dtype=str) if has_subjects else None,
        meta,
    )
    if cache is not None:
        _write_cache(cache, ds)
    return ds


def peak_frames(
    path: str | Path,
    crop: CropConfig | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> EmotionDataset:
    """The last (peak) frame of each clip as a picture set, for the algorithms on stills.

    CK+ is used this way: the peak frame shows the expression at full strength. FedSL reads the
    whole clips again from `meta['source']` with the frames it asks for (`clips_for`)."""
    clips = load_clips(path, 2, crop, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    meta = {k: v for k, v in clips.meta.items() if k != "sequence"}
    meta["format"] = "clips"
    return EmotionDataset(
        name=clips.name,
        images=np.ascontiguousarray(clips.clips[:, -1]),
        labels=clips.labels.copy(),
        subjects=clips.subjects,
        meta=meta,
    )
