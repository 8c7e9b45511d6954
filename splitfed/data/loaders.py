"""Load a data set (KDEF, folder per class, FER2013 CSV, or synthetic) as eye-region crops.

Face detection is the slow part, so the crops of each data set are cached per crop setting.
Images that cannot be read or hold no face are counted and reported, never silently dropped:
a data set that loses a third of its pictures must say so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from splitfed.data.crop import CropConfig, EyeRegionCropper, resolve_backend
from splitfed.data.dataset import SPLIT_ROLE, EmotionDataset
from splitfed.emotions import EMOTIONS, FER2013_TO_INDEX, KDEF_CODES, emotion_index
from splitfed.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("synth", "kdef", "folder", "fer2013", "clips")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
)
KDEF_PATTERN = re.compile(
    r"^(?P<session>[AB])(?P<sex>[FM])(?P<number>\d{2})"
    r"(?P<emotion>AF|AN|DI|HA|NE|SA|SU)(?P<angle>FL|HL|S|HR|FR)\.(?:jpe?g|png)$",
    re.IGNORECASE,
)
# KDEF's camera angles: full left, half left, straight, half right, full right.
KDEF_ANGLES = ("FL", "HL", "S", "HR", "FR")
# FER2013 faces are aligned 48x48 crops: these rows hold the forehead, brows and eyes.
FER_ROWS = (0.05, 0.55)
CACHE_VERSION = 3  # 2: split roles, FER-sized pictures, skipped folders; 3: KDEF angles
MAX_EXAMPLES = 10


def default_cache_dir() -> Path:
    """$SPLITFED_CACHE, else ~/.cache/splitfed/datasets."""
    env = os.environ.get("SPLITFED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitfed" / "datasets"


# -- format detection ----------------------------------------------------------------------------


def visible_files(root: Path) -> Iterator[Path]:
    """Files under `root`, sorted, skipping hidden files and folders (.DS_Store, .git)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise UserError(f"no such file or folder: {path}")


def detect_format(path: str | Path) -> str:
    """Guess the format of `path`: 'synth', 'kdef', 'folder' or 'fer2013'."""
    if str(path) == "synth":
        return "synth"
    p = Path(path).expanduser()
    _check_exists(p)
    if p.is_file():
        if p.suffix.lower() == ".csv":
            header = _csv_header(p)
            if {"emotion", "pixels"} <= set(header):
                return "fer2013"
            raise UserError(
                f"{p}: a CSV data set needs FER2013 columns emotion,pixels; "
                f"found {','.join(header)}"
            )
        raise UserError(f"{p}: expected a folder of images or a FER2013 .csv file")
    from splitfed.data.clip_folders import is_clip_root

    if is_clip_root(p):
        return "clips"
    images = [f for f in visible_files(p) if f.suffix.lower() in IMAGE_EXTENSIONS]
    kdef = sum(1 for f in images if KDEF_PATTERN.match(f.name))
    if images and kdef * 2 >= len(images):
        return "kdef"
    if any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir()):
        return "folder"
    raise UserError(
        f"{p}: cannot tell the data-set format (no KDEF-named images, no class folders); "
        f"use --format with one of {', '.join(FORMATS)}"
    )


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        row = next(csv.reader(fh), [])
    return [c.strip().lower() for c in row]


# -- per-image bookkeeping -----------------------------------------------------------------------


@dataclass
class _Problems:
    """Counts and a few example names of files that did not make it into the data set."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, name: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(name)

    def to_meta(self, kinds: Sequence[str]) -> dict[str, object]:
        meta: dict[str, object] = {}
        for kind in kinds:
            meta[kind] = self.counts.get(kind, 0)
            meta[f"{kind}_files"] = list(self.examples.get(kind, []))
        return meta


PROBLEM_KINDS = (
    "unreadable", "no_face", "excluded_angle", "ignored", "unknown_class", "not_image",
)  # fmt: skip
_PROBLEM_WORDS = {
    "unreadable": "unreadable or not an image",
    "no_face": "without a detectable face",
    "excluded_angle": "not straight-on (KDEF angle other than S; use all_angles to keep)",
    "ignored": "not named like KDEF files",
    "unknown_class": f"not named after an emotion ({', '.join(EMOTIONS)} or a synonym)",
    "not_image": "not image files (by extension)",
}
# Folders that hold a data set's own split (FER2013's folder form has train/ and test/).
SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "test": "test", "testing": "test", "publictest": "test", "privatetest": "test",
    "val": "test", "valid": "test", "validation": "test",
}  # fmt: skip
FER_USAGE = {"training": "train", "publictest": "test", "privatetest": "test"}
# Square pictures of this side are FER2013's aligned faces: too small for a face detector,
# already aligned, so the eye band is cut at fixed rows as for the CSV form.
FER_SIDE = 48


@dataclass
class _Item:
    path: Path
    rel: str
    label: int
    subject: str | None
    session: str | None = None
    angle: str | None = None  # KDEF camera angle
    role: str | None = None  # "train"/"test" from the data set's own split folders


@contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Any]:
    """A rich progress bar when enabled, else a no-op advancer."""
    if not enabled:

        class _Null:
            def advance(self) -> None:
                pass

        yield _Null()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(what, total=total)

        class _Advancer:
            def advance(self) -> None:
                bar.advance(task)

        yield _Advancer()


# -- listing the files of each format ------------------------------------------------------------


def _list_kdef(
    root: Path, all_angles: bool, problems: _Problems, angles: Sequence[str] | None = None
) -> list[_Item]:
    """KDEF files of the angles kept: `angles` if given, else all or straight-on only."""
    keep = {a.upper() for a in angles} if angles else set(KDEF_ANGLES if all_angles else ("S",))
    items: list[_Item] = []
    for f in visible_files(root):
        rel = f.relative_to(root).as_posix()
        m = KDEF_PATTERN.match(f.name)
        if m is None:
            problems.add("ignored", rel)
            continue
        angle = m["angle"].upper()
        if angle not in keep:
            problems.add("excluded_angle", rel)
            continue
        subject = f"{m['sex'].upper()}{m['number']}"
        label = KDEF_CODES[m["emotion"].upper()]
        items.append(_Item(f, rel, label, subject, m["session"].upper(), angle))
    return items


def _read_subjects_csv(path: Path) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "file" not in fields or "subject" not in fields:
            raise UserError(f"{path}: needs a header line 'file,subject', found {','.join(fields)}")
        mapping: dict[str, str] = {}
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if row.get("file"):
                mapping[Path(row["file"]).as_posix()] = row.get("subject", "")
    return mapping


def _class_folders(parent: Path, root: Path, problems: _Problems) -> list[tuple[Path, int]]:
    """Emotion folders of `parent`; other folders are skipped and counted as unknown classes."""
    classes: list[tuple[Path, int]] = []
    for d in sorted(parent.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        idx = emotion_index(d.name)
        if idx is None:
            problems.add("unknown_class", d.relative_to(root).as_posix() + "/")
        else:
            classes.append((d, idx))
    return classes


def _split_folders(root: Path) -> dict[Path, str]:
    """train/ and test/ folders (any case) of a data set that comes with its own split."""
    found = {
        d: SPLIT_FOLDERS[d.name.lower()]
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name.lower() in SPLIT_FOLDERS
    }
    return found if set(found.values()) == {"train", "test"} else {}


def _list_folder(root: Path, problems: _Problems) -> tuple[list[_Item], bool]:
    """Items of a folder-per-class data set, and whether subjects.csv gave subject ids.

    With train/ and test/ folders that each hold class folders, every picture keeps the role
    of its folder. Folders not named after an emotion and files that are not images are
    skipped and counted, so one stray folder does not stop a load.
    """
    splits = _split_folders(root)
    parents: list[tuple[Path, str | None]] = list(splits.items()) or [(root, None)]
    classes: list[tuple[Path, int, str | None]] = []
    for parent, role in parents:
        classes += [(d, idx, role) for d, idx in _class_folders(parent, root, problems)]
    if splits:
        for d in sorted(root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and d not in splits:
                problems.add("unknown_class", d.name + "/")
    if not classes:
        raise UserError(
            f"{root}: no class folders (one subfolder per emotion expected, "
            f"{', '.join(EMOTIONS)} or a synonym; or train/ and test/ folders holding them)"
        )
    subjects_csv = root / "subjects.csv"
    subjects = _read_subjects_csv(subjects_csv) if subjects_csv.is_file() else None
    items: list[_Item] = []
    for d, idx, role in classes:
        for f in visible_files(d):
            rel = f.relative_to(root).as_posix()
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                problems.add("not_image", rel)
                continue
            subject = None if subjects is None else subjects.get(rel)
            items.append(_Item(f, rel, idx, subject, role=role))
    return items, subjects is not None


# -- cache ---------------------------------------------------------------------------------------


def _fingerprint(files: Sequence[Path], root: Path) -> list[tuple[str, int, int]]:
    out = []
    for f in files:
        st = f.stat()
        rel = f.relative_to(root).as_posix() if f != root else f.name
        out.append((rel, st.st_size, st.st_mtime_ns))
    return out


def _cache_key(
    root: Path,
    fmt: str,
    files: Sequence[Path],
    crop: CropConfig,
    all_angles: bool,
    angles: Sequence[str] | None = None,
) -> str:
    """sha256 over what decides the crops: files (names, sizes, mtimes), crop settings, format."""
    backend, model = resolve_backend(crop) if fmt in ("kdef", "folder") else ("none", None)
    extra: dict[str, object] = {"backend": backend}
    if model is not None:
        st = model.stat()
        extra["model"] = [str(model.resolve()), st.st_size, st.st_mtime_ns]
    if fmt == "folder" and (root / "subjects.csv").is_file():
        files = [*files, root / "subjects.csv"]
    payload = {
        "version": CACHE_VERSION,
        "root": str(root.resolve()),
        "format": fmt,
        "files": sorted(_fingerprint(files, root)),
        "crop": json.loads(crop.model_dump_json()),
        "all_angles": all_angles,
        "angles": sorted(angles) if angles else None,
        **extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _save_cache(path: Path, ds: EmotionDataset) -> None:
    arrays: dict[str, np.ndarray] = {"images": ds.images, "labels": ds.labels}
    if ds.subjects is not None:
        arrays["subjects"] = ds.subjects.astype(str)
    plain: dict[str, object] = {}
    for key, value in ds.meta.items():
        if isinstance(value, np.ndarray):
            arrays[f"meta__{key}"] = value
        else:
            plain[key] = value
    arrays["meta_json"] = np.array(json.dumps({"name": ds.name, "meta": plain}))
    save_cache_file(path, arrays, "data-set")


def save_cache_file(path: Path, arrays: dict[str, np.ndarray], what: str) -> None:
    """Write a cache .npz atomically; a cache that cannot be written is only a warning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not write the %s cache %s: %s", what, path, exc)
        tmp.unlink(missing_ok=True)


def _load_cache(path: Path) -> EmotionDataset | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            head = json.loads(str(npz["meta_json"]))
            meta: dict[str, object] = dict(head["meta"])
            for key in npz.files:
                if key.startswith("meta__"):
                    meta[key[len("meta__") :]] = npz[key]
            return EmotionDataset(
                name=head["name"],
                images=npz["images"],
                labels=npz["labels"],
                subjects=npz["subjects"] if "subjects" in npz.files else None,
                meta=meta,
            )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable data-set cache %s: %s", path, exc)
        return None


# -- building each format ------------------------------------------------------------------------


def _crop_items(
    items: list[_Item],
    crop: CropConfig,
    problems: _Problems,
    progress: bool,
) -> tuple[list[np.ndarray], list[_Item], str]:
    """Read and crop every item; unreadable files and faceless images go into `problems`."""
    crops: list[np.ndarray] = []
    kept: list[_Item] = []
    with EyeRegionCropper(crop) as cropper, _progress(progress, len(items), "eye crops") as bar:
        for item in items:
            image = read_image(item.path)
            if image is None:
                problems.add("unreadable", item.rel)
            elif image.shape[:2] == (crop.height, crop.width):
                # Already an eye crop at this size (e.g. `edge-agent collect`): keep as it is.
                crops.append(_as_crop(image, crop))
                kept.append(item)
            elif image.shape[:2] == (FER_SIDE, FER_SIDE):
                crops.append(fer2013_crop(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), crop))
                kept.append(item)
            else:
                out = cropper.crop(image)
                if out is None:
                    problems.add("no_face", item.rel)
                else:
                    crops.append(out)
                    kept.append(item)
            bar.advance()
        backend = cropper.backend
    return crops, kept, backend


def _as_crop(image: np.ndarray, crop: CropConfig) -> np.ndarray:
    if crop.grayscale:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).transpose(2, 0, 1).copy()


def read_image(path: Path) -> np.ndarray | None:
    """cv2.imread that answers None (never raises) for anything that is not a readable image."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
        if data.size == 0:
            return None
        return cv2.imdecode(data, cv2.IMREAD_COLOR)
    except (OSError, cv2.error):
        return None


def _build_images(
    root: Path,
    fmt: str,
    items: list[_Item],
    crop: CropConfig,
    problems: _Problems,
    progress: bool,
    has_subjects: bool,
) -> EmotionDataset:
    crops, kept, backend = _crop_items(items, crop, problems, progress)
    if has_subjects:
        missing = [it.rel for it in kept if not it.subject]
        if missing:
            raise UserError(
                f"{root / 'subjects.csv'} has no subject for {len(missing)} image(s), "
                f"e.g. {', '.join(missing[:3])}"
            )
    meta: dict[str, object] = {"backend": backend}
    if fmt == "kdef":
        meta["sessions"] = np.array([it.session or "" for it in kept], dtype=str)
        meta["angles"] = np.array([it.angle or "" for it in kept], dtype=str)
        listed: dict[str, int] = {}
        for it in items:
            listed[it.angle or ""] = listed.get(it.angle or "", 0) + 1
        meta["files_per_angle"] = listed
    if any(it.role for it in kept):
        meta[SPLIT_ROLE] = np.array([it.role or "" for it in kept], dtype=str)
    return EmotionDataset(
        name=f"{fmt}:{root.name}",
        images=_stack(crops, crop),
        labels=np.array([it.label for it in kept], dtype=np.int64),
        subjects=np.array([it.subject for it in kept], dtype=str) if has_subjects else None,
        meta=meta,
    )


def _stack(crops: list[np.ndarray], crop: CropConfig) -> np.ndarray:
    """The crops as one (N, C, H, W) array; an empty one of that shape when there are none."""
    if crops:
        return np.stack(crops)
    return np.zeros((0, crop.channels, crop.height, crop.width), dtype=np.uint8)


def fer2013_crop(face48: np.ndarray, crop: CropConfig) -> np.ndarray:
    """Eye band of an aligned FER2013 face (rows 5%..55%, full width) at the crop size."""
    h = face48.shape[0]
    top, bottom = round(FER_ROWS[0] * h), round(FER_ROWS[1] * h)
    band = face48[top:bottom]
    interp = cv2.INTER_AREA if band.shape[0] > crop.height else cv2.INTER_LINEAR
    out = cv2.resize(band, (crop.width, crop.height), interpolation=interp)
    if crop.grayscale:
        return out[None]
    return np.repeat(out[None], 3, axis=0)


def _build_fer2013(
    path: Path, crop: CropConfig, problems: _Problems, progress: bool
) -> EmotionDataset:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise UserError(f"{path}: empty CSV file")
    header = [c.strip().lower() for c in rows[0]]
    if "emotion" not in header or "pixels" not in header:
        raise UserError(f"{path}: FER2013 CSV needs columns emotion,pixels; found {rows[0]}")
    i_emo, i_pix = header.index("emotion"), header.index("pixels")
    i_use = header.index("usage") if "usage" in header else None
    crops: list[np.ndarray] = []
    labels: list[int] = []
    usage: list[str] = []
    with _progress(progress, len(rows) - 1, "FER2013 rows") as bar:
        for line, row in enumerate(rows[1:], start=2):
            face = _fer_row(row, i_emo, i_pix)
            if face is None:
                problems.add("unreadable", f"line {line}")
            else:
                crops.append(fer2013_crop(face[1], crop))
                labels.append(face[0])
                if i_use is not None:
                    usage.append(row[i_use].strip() if len(row) > i_use else "")
            bar.advance()
    meta: dict[str, object] = {}
    if i_use is not None:
        meta["usage"] = np.array(usage, dtype=str)
        roles = _usage_roles(path, usage)
        if roles is not None:
            meta[SPLIT_ROLE] = roles
    return EmotionDataset(
        name=f"fer2013:{path.stem}",
        images=_stack(crops, crop),
        labels=np.array(labels, dtype=np.int64),
        subjects=None,
        meta=meta,
    )


def _usage_roles(path: Path, usage: list[str]) -> np.ndarray | None:
    """FER2013's own split: Training rows train, PublicTest and PrivateTest rows test.

    Rows with another Usage value train (and are counted in a warning); a file whose rows are
    all on one side has no usable split of its own.
    """
    roles = np.array([FER_USAGE.get(u.strip().lower(), "train") for u in usage], dtype=str)
    unknown = [u for u in usage if u.strip().lower() not in FER_USAGE]
    if unknown:
        log.warning(
            "%s: %d row(s) with a Usage other than Training/PublicTest/PrivateTest (e.g. %r) "
            "are used for training",
            path,
            len(unknown),
            unknown[0],
        )
    if set(roles.tolist()) != {"train", "test"}:
        log.info("%s: the Usage column holds one side only; no split of its own", path)
        return None
    return roles


def _fer_row(row: list[str], i_emo: int, i_pix: int) -> tuple[int, np.ndarray] | None:
    try:
        label = FER2013_TO_INDEX[int(row[i_emo])]
        pixels = np.array(row[i_pix].split(), dtype=np.int64)
    except (IndexError, ValueError, KeyError):
        return None
    side = int(round(np.sqrt(pixels.size)))
    if side < 8 or side * side != pixels.size or pixels.min() < 0 or pixels.max() > 255:
        return None
    return label, pixels.astype(np.uint8).reshape(side, side)


# -- public entry points -------------------------------------------------------------------------


def load_dataset(
    source: str,
    data_format: str | None = None,
    crop: CropConfig | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
    all_angles: bool = False,
    use_cache: bool = True,
    angles: Sequence[str] | None = None,
) -> EmotionDataset:
    """Load `source` (a path or 'synth') as eye-region crops, from the cache when possible.

    KDEF keeps the straight-on pictures, all five angles with `all_angles`, or the `angles`
    named (e.g. S, HL, HR); `meta['angles']` says each picture's angle. A folder of clips
    (format 'clips') loads as the last (peak) frame of each clip.

    `meta` holds the format, crop settings, detector backend, counts and example names of
    unreadable / faceless / excluded files, and `cache_hit`.
    """
    fmt = (data_format or "").strip().lower() or None
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown data format {data_format!r}: use one of {', '.join(FORMATS)}")
    if fmt == "synth" or (fmt is None and source == "synth"):
        from splitfed.data.synth import generate_synth

        ds = generate_synth()
        ds.meta.setdefault("format", "synth")
        ds.meta.setdefault("cache_hit", False)
        return ds
    crop = crop or CropConfig()
    root = Path(source).expanduser()
    _check_exists(root)
    fmt = fmt or detect_format(root)
    if fmt == "fer2013" and not root.is_file():
        raise UserError(f"{root}: format fer2013 needs a .csv file, not a folder")
    if angles is not None:
        bad = [a for a in angles if a.upper() not in KDEF_ANGLES]
        if bad or not angles:
            raise UserError(f"unknown KDEF angle(s) {bad}: use {', '.join(KDEF_ANGLES)}")
    if fmt == "clips":
        from splitfed.data.clip_folders import peak_frames

        return peak_frames(root, crop, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    if fmt in ("kdef", "folder") and not root.is_dir():
        raise UserError(f"{root}: format {fmt} needs a folder of images")

    problems = _Problems()
    items: list[_Item] = []
    has_subjects = fmt == "kdef"
    if fmt == "kdef":
        items = _list_kdef(root, all_angles, problems, angles)
        files = [root / it.rel for it in items]
    elif fmt == "folder":
        items, has_subjects = _list_folder(root, problems)
        files = [it.path for it in items]
    else:
        files = [root]

    key = _cache_key(root if root.is_dir() else root.parent, fmt, files, crop, all_angles, angles)
    cache_file = None
    if use_cache:
        cache_file = (cache_dir or default_cache_dir()) / f"{fmt}-{root.stem}-{key[:20]}.npz"
        if cache_file.is_file():
            cached = _load_cache(cache_file)
            if cached is not None:
                log.info("data set %s: %d crops from cache %s", root, len(cached), cache_file)
                cached.meta["cache_hit"] = True
                cached.meta["cache_file"] = str(cache_file)
                _report_problems(root, cached.meta)
                return cached

    if fmt == "fer2013":
        ds = _build_fer2013(root, crop, problems, progress)
    else:
        if not items:
            raise UserError(_empty_reason(root, fmt, problems))
        ds = _build_images(root, fmt, items, crop, problems, progress, has_subjects)
    ds.meta.update(
        {
            "format": fmt,
            "source": str(root.resolve()),
            "crop": json.loads(crop.model_dump_json()),
            "all_angles": all_angles,
            "files_seen": len(items)
            if fmt != "fer2013"
            else len(ds) + problems.counts.get("unreadable", 0),
            **problems.to_meta(PROBLEM_KINDS),
        }
    )
    if len(ds) == 0:
        raise UserError(_empty_reason(root, fmt, problems))
    _report_problems(root, ds.meta)
    if cache_file is not None:
        _save_cache(cache_file, ds)
        log.info("data set %s: %d crops cached in %s", root, len(ds), cache_file)
    ds.meta["cache_hit"] = False
    ds.meta["cache_file"] = str(cache_file) if cache_file is not None else None
    return ds


def _empty_reason(root: Path, fmt: str, problems: _Problems) -> str:
    lost = [
        f"{problems.counts[k]} {_PROBLEM_WORDS[k]}" for k in PROBLEM_KINDS if problems.counts.get(k)
    ]
    why = "; ".join(lost) if lost else "no image files found"
    return f"no usable images in {root} (format {fmt}): {why}"


def _count(meta: dict[str, object], kind: str) -> int:
    value = meta.get(kind, 0)
    return int(value) if isinstance(value, (int, np.integer)) else 0


def _examples(meta: dict[str, object], kind: str) -> list[str]:
    value = meta.get(f"{kind}_files")
    return [str(v) for v in value] if isinstance(value, (list, tuple, np.ndarray)) else []


def _report_problems(root: Path, meta: dict[str, object]) -> None:
    for kind in ("unreadable", "no_face", "unknown_class", "not_image"):
        n = _count(meta, kind)
        if n:
            what = {"unknown_class": "folder(s)", "not_image": "file(s)"}.get(kind, "image(s)")
            log.warning(
                "%s: %d %s %s, skipped: %s",
                root,
                n,
                what,
                _PROBLEM_WORDS[kind],
                ", ".join(_examples(meta, kind)[:5]) + (", ..." if n > 5 else ""),
            )
    for kind in ("excluded_angle", "ignored"):
        n = _count(meta, kind)
        if n:
            log.info("%s: %d file(s) %s", root, n, _PROBLEM_WORDS[kind])


# -- the `aggregator prepare` report -------------------------------------------------------------


def prepare_report(ds: EmotionDataset) -> dict[str, object]:
    """Counts per class and per subject, and what was left out, as plain data."""
    meta = ds.meta
    report: dict[str, object] = {
        "name": ds.name,
        "format": meta.get("format"),
        "source": meta.get("source"),
        "images": len(ds),
        "shape": list(ds.input_shape),
        "backend": meta.get("backend"),
        "classes": ds.class_counts(),
        "subjects": ds.subject_counts() if ds.has_subjects else None,
        "cache_hit": bool(meta.get("cache_hit", False)),
        "cache_file": meta.get("cache_file"),
        "own_split": None,
    }
    roles = ds.split_roles
    if roles is not None:
        report["own_split"] = {r: int(np.sum(roles == r)) for r in ("train", "test")}
    for kind in PROBLEM_KINDS:
        report[kind] = _count(meta, kind)
        report[f"{kind}_files"] = _examples(meta, kind)
    return report


def prepare(
    source: str,
    data_format: str | None = None,
    crop: CropConfig | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
    all_angles: bool = False,
) -> tuple[EmotionDataset, dict[str, object]]:
    """Load (and cache) a data set, returning it with its `prepare_report`."""
    ds = load_dataset(
        source, data_format, crop, cache_dir=cache_dir, progress=progress, all_angles=all_angles
    )
    return ds, prepare_report(ds)


def render_report(report: dict[str, object]) -> Any:
    """The report as rich renderables (a summary table, classes, subjects), for printing."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title=f"data set {report['name']}", show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    summary.add_row("source", str(report.get("source") or report["name"]))
    summary.add_row("format", str(report.get("format")))
    summary.add_row("images", str(report["images"]))
    summary.add_row("crop (C, H, W)", str(tuple(report["shape"])))  # type: ignore[arg-type]
    if report.get("backend"):
        summary.add_row("face detector", str(report["backend"]))
    for kind in PROBLEM_KINDS:
        n = report.get(kind, 0)
        if n:
            examples = ", ".join(report.get(f"{kind}_files", [])[:5])  # type: ignore[index]
            summary.add_row(f"{kind.replace('_', ' ')}", f"{n}  ({examples})")
    if report.get("cache_file"):
        state = "hit" if report.get("cache_hit") else "built"
        summary.add_row("cache", f"{state}: {report['cache_file']}")
    classes = Table(title="images per class")
    classes.add_column("emotion")
    classes.add_column("images", justify="right")
    for name, n in report["classes"].items():  # type: ignore[union-attr]
        classes.add_row(name, str(n))
    parts: list[Any] = [summary, classes]
    subjects = report.get("subjects")
    if subjects:
        people = Table(title=f"images per subject ({len(subjects)} people)")  # type: ignore[arg-type]
        people.add_column("subject")
        people.add_column("images", justify="right")
        for sid, n in subjects.items():  # type: ignore[union-attr]
            people.add_row(sid, str(n))
        parts.append(people)
    own = report.get("own_split")
    if own:
        parts.append(
            f"the data set's own split is used by default: {own['train']} train / "  # type: ignore[index]
            f"{own['test']} test pictures"  # type: ignore[index]
        )
    elif not subjects:
        parts.append(
            "no subject ids: the split will be random, with the same people in train and test; "
            "add subjects.csv (file,subject) to keep people apart"
        )
    return Group(*parts)


def report_text(report: dict[str, object], width: int = 100) -> str:
    """The report rendered as plain text (no colour codes)."""
    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(render_report(report))
    return console.file.getvalue()  # type: ignore[attr-defined]
