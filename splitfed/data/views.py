"""Multi-view vertical data: several cameras photograph the same person at the same moment.

KDEF shot every expression of every sitting with five cameras at once (full left, half left,
straight, half right, full right). Session + subject + emotion names one moment, the record;
the angle names the camera. Here each camera is a PyVertical data owner: owner k holds the eye
crops of view k under the record ids, and the label holder holds each record's emotion. A view
whose face the detector does not find leaves that record out of that owner only, so the owners'
id sets differ and private set intersection finds the records every party holds.

The split is by person (subject, e.g. F01, in both sessions), the split every other algorithm
uses, so test people are never trained on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitfed.data.clips import shard_indices
from splitfed.data.crop import CropConfig
from splitfed.data.dataset import EmotionDataset, SplitKind
from splitfed.data.loaders import KDEF_ANGLES, load_dataset
from splitfed.data.vertical import LabelTable, OwnerTable, VerticalData, check_overlap
from splitfed.emotions import KDEF_CODES
from splitfed.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_VIEWS = ("S", "HL", "HR")
_CODE_OF = {v: k for k, v in KDEF_CODES.items()}


def parse_views(text: str | Sequence[str]) -> tuple[str, ...]:
    """'S,HL,HR' (or a sequence) as distinct KDEF angle codes, in the order given."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    views = tuple(p.strip().upper() for p in parts if p.strip())
    bad = [v for v in views if v not in KDEF_ANGLES]
    if not views or bad:
        raise UserError(
            f"--views takes KDEF angles separated by commas ({', '.join(KDEF_ANGLES)}), "
            f"got {text!r}"
        )
    if len(set(views)) != len(views):
        raise UserError(f"--views names an angle twice: {text!r}")
    return views


def load_views(
    path: str | Path,
    views: Sequence[str] = DEFAULT_VIEWS,
    crop: CropConfig | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> EmotionDataset:
    """The KDEF pictures of `views`, each cropped like any KDEF picture, with its angle in meta.

    `meta['views']` names the views (owner k holds views[k]); `meta['view_counts']` says per
    view how many files were found and how many were skipped (no face, unreadable)."""
    views = parse_views(views)
    ds = load_dataset(
        str(path),
        "kdef",
        crop,
        cache_dir=cache_dir,
        progress=progress,
        use_cache=use_cache,
        angles=views,
    )
    angles = np.asarray(ds.meta["angles"])
    listed = ds.meta.get("files_per_angle") or {}
    counts: dict[str, dict[str, int]] = {}
    for v in views:
        kept = int(np.sum(angles == v))
        files = int(listed.get(v, kept)) if isinstance(listed, dict) else kept
        counts[v] = {"files": files, "kept": kept, "skipped": files - kept}
        if files > kept:
            log.warning(
                "view %s: %d of %d picture(s) skipped (no face found or unreadable)",
                v,
                files - kept,
                files,
            )
    ds.meta["views"] = list(views)
    ds.meta["view_counts"] = counts
    return ds


def record_key(session: str, subject: str, label: int) -> str:
    """KDEF's name for one moment: session + subject + emotion, e.g. AF01AN."""
    return f"{session}{subject}{_CODE_OF[int(label)]}"


def _record_id(name: str, key: str) -> str:
    """An opaque pseudonym of the record, the kind of shared key vertical partners use."""
    return "r" + hashlib.sha256(f"{name}|views|{key}".encode()).hexdigest()[:20]


def views_partition(
    ds: EmotionDataset,
    views: Sequence[str] | None = None,
    split: SplitKind | None = None,
    seed: int = 0,
) -> VerticalData:
    """Owner k holds the crops of view k by record id; the label holder every record's label.

    A record the detector missed in one view is absent from that owner only. Test records are
    whole people: the subject split of `shard_indices` over the records with the same seed."""
    views = parse_views(views or ds.meta.get("views") or DEFAULT_VIEWS)  # type: ignore[arg-type]
    if "angles" not in ds.meta or "sessions" not in ds.meta or ds.subjects is None:
        raise UserError(f"{ds.name}: multi-view owners need KDEF pictures (angle, session, person)")
    angles = np.asarray(ds.meta["angles"])
    sessions = np.asarray(ds.meta["sessions"])
    keys = np.asarray(
        [
            record_key(str(s), str(p), int(y))
            for s, p, y in zip(sessions, ds.subjects, ds.labels, strict=True)
        ]
    )
    held = np.isin(angles, views)
    if not held.any():
        raise UserError(f"{ds.name}: no pictures of the views {', '.join(views)}")
    records, first = np.unique(keys[held], return_index=True)
    rows_held = np.flatnonzero(held)[first]
    rec_labels = ds.labels[rows_held]
    rec_subjects = ds.subjects[rows_held]
    split = split or "subject"
    _, test_idx, _ = shard_indices(rec_labels, rec_subjects, 1, "iid", split, seed, ds.name)
    is_test = np.zeros(len(records), dtype=bool)
    is_test[test_idx] = True
    ids = np.asarray([_record_id(ds.name, k) for k in records])
    id_of = dict(zip(records.tolist(), ids.tolist(), strict=True))

    _, h, w = ds.input_shape
    owners: list[OwnerTable] = []
    source_rows: dict[str, int] = {}
    for k, view in enumerate(views):
        rows = np.flatnonzero(angles == view)
        _, uniq = np.unique(keys[rows], return_index=True)  # one picture per record and view
        if len(uniq) < len(rows):
            log.warning(
                "view %s: %d duplicate picture(s) of a record ignored", view, len(rows) - len(uniq)
            )
        rows = rows[np.sort(uniq)]
        # Each party stores its rows in its own order, drawn from its own seed: owner k's table
        # depends on its own view's pictures only, as on a deployed camera.
        order = np.random.default_rng([seed, 0x71E5, k]).permutation(len(rows))
        rows = rows[order]
        owner_ids = np.asarray([id_of[str(key)] for key in keys[rows]])
        owners.append(OwnerTable(f"owner-{k}", owner_ids, ds.images[rows], (0, h, 0, w)))
        for i, r in zip(owner_ids.tolist(), rows.tolist(), strict=True):
            source_rows.setdefault(i, int(r))
    order = np.random.default_rng([seed, 0x71E5, len(views)]).permutation(len(ids))
    labels = LabelTable(ids[order], rec_labels[order], is_test[order])
    data = VerticalData(
        owners, labels, ds.input_shape, ds.name, split, source_rows, views=list(views)
    )
    check_overlap(data)
    common = len(data.true_intersection())
    log.info(
        "multi-view owners %s: %s records each, %d of %d records in every view",
        ",".join(views),
        "/".join(str(len(o)) for o in owners),
        common,
        len(ids),
    )
    return data


def view_owner(data: EmotionDataset, spec: Any, index: int) -> OwnerTable:
    """An `OwnerSource` (see `splitfed.algorithms.pyvertical.parties`) for a deployed camera:
    owner `index` holds view `index` of each record; `spec` gives the run's seed and split."""
    views = data.meta.get("views") or DEFAULT_VIEWS
    if not 0 <= index < len(views):  # type: ignore[arg-type]
        raise UserError(f"owner index {index} outside the {len(views)} views {views}")  # type: ignore[arg-type]
    return views_partition(data, split=spec.split, seed=spec.seed).owners[index]


def kdef_views(
    path: str | Path,
    views: Sequence[str] = DEFAULT_VIEWS,
    split: SplitKind | None = None,
    seed: int = 0,
    crop: CropConfig | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> VerticalData:
    """KDEF as a vertical federation of cameras: `load_views` then `views_partition`."""
    ds = load_views(path, views, crop, cache_dir=cache_dir, use_cache=use_cache)
    return views_partition(ds, views, split, seed)
