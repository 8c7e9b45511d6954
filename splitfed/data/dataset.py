"""The in-memory data set every loader returns, and the train/test split.

Images are kept as uint8 `(N, C, H, W)` eye-region crops: small enough to cache and to hold a
whole shard on a Raspberry Pi, and converted to float only per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from splitfed.emotions import EMOTIONS, NUM_CLASSES
from splitfed.errors import UserError

log = logging.getLogger(__name__)

SplitKind = Literal["subject", "random", "predefined"]
# A split is a SplitKind or "fold:I/K": fold I (1-based) of a K-fold split by person.
FOLD_PREFIX = "fold:"
# meta key of a per-picture "train"/"test" array: the data set's own split (FER2013's Usage
# column, or train/ and test/ folders), used by the `predefined` split.
SPLIT_ROLE = "split_role"
_warned_mixed: set[str] = set()


@dataclass
class EmotionDataset:
    """Eye-region crops with their emotion labels and, where known, who is in each picture."""

    name: str
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,), indices into EMOTIONS
    subjects: np.ndarray | None = None  # str (N,) person ids; None when the source has none
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.labels) != len(self.images):
            raise ValueError("labels and images differ in length")
        if self.subjects is not None and len(self.subjects) != len(self.images):
            raise ValueError("subjects and images differ in length")
        self.labels = self.labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def has_subjects(self) -> bool:
        return self.subjects is not None

    def subset(self, index: np.ndarray, name: str | None = None) -> EmotionDataset:
        """The pictures at `index`; per-picture meta arrays (sessions, split roles) follow them."""
        n = len(self)
        meta = {
            k: v[index] if isinstance(v, np.ndarray) and v.ndim == 1 and len(v) == n else v
            for k, v in self.meta.items()
        }
        return EmotionDataset(
            name=name or self.name,
            images=self.images[index],
            labels=self.labels[index],
            subjects=None if self.subjects is None else self.subjects[index],
            meta=meta,
        )

    @property
    def split_roles(self) -> np.ndarray | None:
        """Per picture "train" or "test" when the data set comes with its own split, else None."""
        roles = self.meta.get(SPLIT_ROLE)
        if isinstance(roles, np.ndarray) and len(roles) == len(self):
            kinds = set(np.unique(roles).tolist())
            if kinds == {"train", "test"}:
                return roles
        return None

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=NUM_CLASSES)
        return {EMOTIONS[i]: int(c) for i, c in enumerate(counts)}

    def subject_counts(self) -> dict[str, int]:
        if self.subjects is None:
            return {}
        ids, counts = np.unique(self.subjects, return_counts=True)
        return {str(i): int(c) for i, c in zip(ids, counts)}


def default_split(ds: EmotionDataset) -> SplitKind:
    """The data set's own split when it has one, else by person, else random (with a warning)."""
    if ds.split_roles is not None:
        return "predefined"
    return "subject" if ds.has_subjects else "random"


def warn_people_mixed(ds: EmotionDataset) -> None:
    """Say once per data set that test accuracy will include people seen in training."""
    if ds.name in _warned_mixed:
        return
    _warned_mixed.add(ds.name)
    log.warning(
        "%s has no subject ids, so the random split cannot keep people apart: the same people "
        "are in train and test and test accuracy overstates accuracy on new people. Fix: add "
        "subjects.csv (header file,subject; one line per picture, file relative to the data-set "
        "folder) and the split keeps each person on one side",
        ds.name,
    )


def fold_split(index: int, folds: int) -> str:
    """The split name of fold `index` (0-based) of `folds`, as `train_test_split` reads it."""
    return f"{FOLD_PREFIX}{index + 1}/{folds}"


def parse_fold(kind: str) -> tuple[int, int] | None:
    """(0-based fold, number of folds) of a "fold:I/K" split, None for the other kinds."""
    if not kind.startswith(FOLD_PREFIX):
        return None
    try:
        i, k = (int(v) for v in kind[len(FOLD_PREFIX) :].split("/"))
    except ValueError:
        raise UserError(f"a fold split reads fold:I/K (e.g. fold:1/5), got {kind!r}") from None
    if not (k >= 2 and 1 <= i <= k):
        raise UserError(f"fold:I/K needs K >= 2 and 1 <= I <= K, got {kind!r}")
    return i - 1, k


def fold_people(subjects: np.ndarray, folds: int, seed: int) -> list[set[str]]:
    """The people of each test fold: every person in exactly one, folds differing by at most one.

    Depends only on the set of people and the seed, so every algorithm (and the clip and vertical
    views of the same people) tests fold i on the same people.
    """
    people = np.unique(subjects)
    if folds > len(people):
        raise UserError(f"{folds} folds need at least {folds} people, the data have {len(people)}")
    rng = np.random.default_rng([seed, 0xF01D])
    order = people[rng.permutation(len(people))]
    return [set(part.tolist()) for part in np.array_split(order, folds)]


def train_test_split(
    ds: EmotionDataset, kind: SplitKind | str, test_fraction: float = 0.2, seed: int = 0
) -> tuple[EmotionDataset, EmotionDataset]:
    """Split into train and test; `subject` and folds keep every person on one side only."""
    if len(ds) == 0:
        raise UserError(f"data set {ds.name!r} is empty")
    rng = np.random.default_rng([seed, 0x5E1])
    fold = parse_fold(kind)
    if fold is not None:
        if ds.subjects is None:
            raise UserError(
                f"--folds keeps test people apart and needs subject ids, and {ds.name!r} has "
                "none: add subjects.csv (header file,subject; one line per picture)"
            )
        if ds.split_roles is not None:
            log.warning("%s: cross-validation folds replace the data set's own split", ds.name)
        test_people = fold_people(ds.subjects, fold[1], seed)[fold[0]]
        is_test = np.array([s in test_people for s in ds.subjects])
    elif kind == "subject":
        if ds.subjects is None:
            raise UserError(
                f"--split subject needs subject ids, and {ds.name!r} has none; use --split random"
            )
        people = np.unique(ds.subjects)
        if len(people) < 2:
            raise UserError(
                f"--split subject needs at least 2 people, {ds.name!r} has {len(people)}"
            )
        people = people[rng.permutation(len(people))]
        n_test = min(len(people) - 1, max(1, int(round(test_fraction * len(people)))))
        test_people = set(people[:n_test].tolist())
        is_test = np.array([s in test_people for s in ds.subjects])
    elif kind == "predefined":
        roles = ds.split_roles
        if roles is None:
            raise UserError(
                f"--split predefined needs a data set with its own train/test split (FER2013's "
                f"Usage column, or train/ and test/ folders), and {ds.name!r} has none"
            )
        is_test = roles == "test"
    elif kind == "random":
        if ds.subjects is None:
            warn_people_mixed(ds)
        order = rng.permutation(len(ds))
        n_test = max(1, int(round(test_fraction * len(ds))))
        is_test = np.zeros(len(ds), dtype=bool)
        is_test[order[:n_test]] = True
    else:
        raise UserError(f"unknown split {kind!r}: use subject, random or predefined")
    train = ds.subset(np.flatnonzero(~is_test), f"{ds.name}:train")
    test = ds.subset(np.flatnonzero(is_test), f"{ds.name}:test")
    return train, test
