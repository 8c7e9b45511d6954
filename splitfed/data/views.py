"""Multi-view vertical data: several cameras photograph the same person at the same moment.

KDEF shot every expression of every sitting with five cameras at once (full left, half left,
straight, half right, full right). Session + subject + emotion names one moment, the record;
the angle names the camera. Here each camera is a PyVertical data owner: owner k holds the eye
crops of view k under the record ids, and the label holder holds each record's emotion. A view
whose face the detector does not find leaves that record out of that owner only, so the owners'
id sets differ and private set intersection finds the records every party holds.

The split is by person (subject, e.g. F01, in both sessions), the split every other algorithm
uses, so test people are never trained on. It is the label holder's business alone.

Deployed, each camera holds only its own photos: `view_table` builds owner k's table from the
pictures of view k alone, naming each record by `record_id` (its KDEF name and a salt the
federation shares, nothing local such as a folder name), and `view_labels` the label holder's
table. `views_partition` (the simulator) is made of the same two functions, so a deployed run
(`edge-agent --role owner --views`, `aggregator serve --views`) and `simulate --views` hold
the same tables row for row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


DEFAULT_SALT = "splitfed-views"


def record_id(key: str, salt: str = DEFAULT_SALT) -> str:
    """An opaque pseudonym of the record, the kind of shared key vertical partners use.

    Made of the record's name (session + subject + emotion, in every camera's file name) and a
    salt every party of the federation shares, never of anything local such as the folder a
    camera keeps its photos in: each camera computes the ids of its own photos alone, and the
    label holder the same ids for its labels."""
    return "r" + hashlib.sha256(f"{salt}|views|{key}".encode()).hexdigest()[:20]


def _kdef_keys(ds: EmotionDataset) -> tuple[np.ndarray, np.ndarray]:
    """(angle, record key) of each picture of a multi-view KDEF set."""
    if "angles" not in ds.meta or "sessions" not in ds.meta or ds.subjects is None:
        raise UserError(f"{ds.name}: multi-view owners need KDEF pictures (angle, session, person)")
    sessions = np.asarray(ds.meta["sessions"])
    keys = np.asarray(
        [
            record_key(str(s), str(p), int(y))
            for s, p, y in zip(sessions, ds.subjects, ds.labels, strict=True)
        ],
        dtype=str,
    )
    return np.asarray(ds.meta["angles"]), keys


def _view_rows(
    ds: EmotionDataset, view: str, index: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `ds`, record keys) of owner `index`'s table of `view`, in its stored order.

    Records in key order, one picture each (a duplicate is dropped), then shuffled from the
    run's seed and the owner's index: nothing but this view's pictures decides the table, so a
    camera that loaded only its own photos stores exactly what its simulated twin stores."""
    angles, keys = _kdef_keys(ds)
    rows = np.flatnonzero(angles == view)
    _, uniq = np.unique(keys[rows], return_index=True)  # sorted by key, first picture of each
    if len(uniq) < len(rows):
        log.warning(
            "view %s: %d duplicate picture(s) of a record ignored", view, len(rows) - len(uniq)
        )
    rows = rows[uniq]
    order = np.random.default_rng([seed, 0x71E5, index]).permutation(len(rows))
    rows = rows[order]
    return rows, keys[rows]


def view_table(
    ds: EmotionDataset, view: str, index: int, seed: int = 0, salt: str = DEFAULT_SALT
) -> OwnerTable:
    """Owner `index`'s table: the crops of `view` in `ds` (other views in it are ignored)."""
    rows, keys = _view_rows(ds, view, index, seed)
    _, h, w = ds.input_shape
    ids = np.asarray([record_id(str(k), salt) for k in keys])
    if not len(ids):
        raise UserError(f"{ds.name}: no pictures of the view {view}")
    return OwnerTable(f"owner-{index}", ids, ds.images[rows], (0, h, 0, w))


def view_labels(
    ds: EmotionDataset,
    views: Sequence[str],
    split: SplitKind | None = None,
    seed: int = 0,
    salt: str = DEFAULT_SALT,
) -> tuple[LabelTable, np.ndarray]:
    """The label holder's table: every record some view of `ds` holds, its emotion, and whether
    it is held out (whole people: `shard_indices`'s subject split of the records with `seed`).
    The split is the label holder's alone; owners never learn which records are test records
    beyond the aligned test ids it sends them.

    Also returns a row of `ds` of each record, in the table's order (for reference runs)."""
    views = parse_views(views)
    angles, keys = _kdef_keys(ds)
    held = np.isin(angles, views)
    if not held.any():
        raise UserError(f"{ds.name}: no pictures of the views {', '.join(views)}")
    records, first = np.unique(keys[held], return_index=True)
    rows = np.flatnonzero(held)[first]
    assert ds.subjects is not None
    rec_labels = ds.labels[rows]
    _, test_idx, _ = shard_indices(
        rec_labels, ds.subjects[rows], 1, "iid", split or "subject", seed, ds.name
    )
    is_test = np.zeros(len(records), dtype=bool)
    is_test[test_idx] = True
    ids = np.asarray([record_id(str(k), salt) for k in records])
    order = np.random.default_rng([seed, 0x71E5, len(views)]).permutation(len(ids))
    return LabelTable(ids[order], rec_labels[order], is_test[order]), rows[order]


def views_partition(
    ds: EmotionDataset,
    views: Sequence[str] | None = None,
    split: SplitKind | None = None,
    seed: int = 0,
    salt: str = DEFAULT_SALT,
) -> VerticalData:
    """Owner k holds the crops of view k by record id; the label holder every record's label.

    A record the detector missed in one view is absent from that owner only. Test records are
    whole people: the subject split of `shard_indices` over the records with the same seed.
    Each table is the one its deployed party builds alone (`view_table`, `view_labels`)."""
    views = parse_views(views or ds.meta.get("views") or DEFAULT_VIEWS)  # type: ignore[arg-type]
    _kdef_keys(ds)  # a KDEF set, or a UserError before anything else
    labels, _ = view_labels(ds, views, split, seed, salt)
    owners = [view_table(ds, v, k, seed, salt) for k, v in enumerate(views)]
    source_rows: dict[str, int] = {}
    for k, v in enumerate(views):  # the first view's picture of each record, for reference runs
        rows, _ = _view_rows(ds, v, k, seed)
        for i, r in zip(owners[k].ids.tolist(), rows.tolist(), strict=True):
            source_rows.setdefault(i, int(r))
    data = VerticalData(
        owners, labels, ds.input_shape, ds.name, split or "subject", source_rows, views=list(views)
    )
    check_overlap(data)
    common = len(data.true_intersection())
    log.info(
        "multi-view owners %s: %s records each, %d of %d records in every view",
        ",".join(views),
        "/".join(str(len(o)) for o in owners),
        common,
        len(labels.ids),
    )
    return data


@dataclass(frozen=True)
class ViewSpec:
    """What the cameras of one run agree on: the views in owner order, the seed, the salt."""

    views: tuple[str, ...] = DEFAULT_VIEWS
    seed: int = 0
    salt: str = DEFAULT_SALT


def view_owner(data: EmotionDataset, spec: ViewSpec, index: int) -> OwnerTable:
    """A deployed camera's table: owner `index` holds view `index` of `spec.views`. `data`
    needs only that view's pictures (`load_views(path, [view])`); other views are ignored."""
    views = parse_views(spec.views)
    if not 0 <= index < len(views):
        raise UserError(f"owner index {index} outside the {len(views)} views {','.join(views)}")
    table = view_table(data, views[index], index, spec.seed, spec.salt)
    log.info(
        "data owner %d of %d: camera %s, %d records", index, len(views), views[index], len(table)
    )
    return table


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
