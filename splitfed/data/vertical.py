"""Vertically partitioned eye regions: each data owner holds one part of the same people's crops.

Owner k holds a rectangle of every crop it has (with two owners the left and the right half,
with more a forehead-and-brow band and an eye band, each cut into strips), each under a record
id. The label holder (the data scientist of PyVertical) holds the labels under the same ids. No
party holds every record: each one misses some records and holds a few that no one else has, so
their id sets overlap only in part and private set intersection has to find the common records.

`splitfed.data.views` builds real vertical data instead: one camera angle per owner, each
holding whole crops (their boxes are all the whole crop).

Record ids are opaque pseudonyms (a hash of the person and the picture), the kind of shared key
that vertical partners use; each party stores its rows in its own order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.data.batches import num_batches, to_tensor
from splitfed.data.clips import shard_indices
from splitfed.data.dataset import EmotionDataset, SplitKind
from splitfed.errors import UserError
from splitfed.psi import check_ids

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 in pixels of the full crop


class VerticalConfig(BaseModel):
    """How the records are shared among the data owners and the label holder."""

    model_config = ConfigDict(extra="forbid")

    owners: int = Field(2, ge=1, le=32, description="number of data owners (vertical parts)")
    overlap: float = Field(
        0.85, gt=0, le=1, description="expected share of records every party holds"
    )
    extra: float = Field(
        0.05,
        ge=0,
        le=1,
        description="records each party holds that no one else has, as a share of the data set",
    )
    align: int = Field(
        8, ge=1, description="part edges fall on multiples of this (the device half's scale)"
    )
    seed: int = Field(0, description="seed of who misses which records")


def _cuts(length: int, parts: int, align: int) -> list[int]:
    """Split [0, length) into `parts` runs whose edges are multiples of `align`."""
    units = length // align
    if units < parts:
        raise UserError(f"cannot cut {length} pixels into {parts} parts of at least {align} pixels")
    edges = [round(i * units / parts) * align for i in range(parts)] + [length]
    return edges


def part_boxes(n: int, height: int, width: int, align: int = 8) -> list[Box]:
    """The rectangle each of n owners holds.

    1: the whole crop; 2: the left and the right eye (each half with its brow); 3 and more: the
    forehead-and-brow band on top and the eye band below, each cut into vertical strips.
    """
    if n < 1:
        raise UserError("need at least one data owner")
    if n == 1:
        return [(0, height, 0, width)]
    if n == 2:
        xs = _cuts(width, 2, align)
        return [(0, height, xs[0], xs[1]), (0, height, xs[1], xs[2])]
    ys = _cuts(height, 2, align)
    boxes: list[Box] = []
    for row, strips in enumerate((n // 2, n - n // 2)):
        xs = _cuts(width, strips, align)
        boxes += [(ys[row], ys[row + 1], xs[i], xs[i + 1]) for i in range(strips)]
    return boxes


def crop_part(images: np.ndarray, box: Box) -> np.ndarray:
    y0, y1, x0, x1 = box
    return np.ascontiguousarray(images[:, :, y0:y1, x0:x1])


def record_ids(ds: EmotionDataset) -> np.ndarray:
    """A pseudonymous id per record from who is in it and which of their pictures it is."""
    people = ds.subjects if ds.subjects is not None else np.full(len(ds), "-")
    counter: dict[str, int] = {}
    ids = []
    for p in people:
        k = counter.get(str(p), 0)
        counter[str(p)] = k + 1
        ids.append("r" + hashlib.sha256(f"{ds.name}|{p}|{k}".encode()).hexdigest()[:20])
    return np.asarray(ids)


@dataclass
class OwnerTable:
    """What one data owner holds: its part of each of its records, by record id."""

    name: str
    ids: np.ndarray  # str (N,)
    images: np.ndarray  # uint8 (N, C, h, w)
    box: Box

    def __post_init__(self) -> None:
        check_ids(self.ids.tolist(), self.name)
        if (
            self.images.ndim != 4
            or self.images.dtype != np.uint8
            or len(self.images) != len(self.ids)
        ):
            raise ValueError(f"{self.name}: images must be uint8 (N, C, h, w), one per id")
        y0, y1, x0, x1 = self.box
        if self.images.shape[2:] != (y1 - y0, x1 - x0):
            raise UserError(
                f"{self.name}: parts are {self.images.shape[2:]}, its box {self.box} says "
                f"{(y1 - y0, x1 - x0)}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def part_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of `ids` in this table; an id it does not hold is an error."""
        where = {s: i for i, s in enumerate(self.ids.tolist())}
        missing = [s for s in ids if s not in where]
        if missing:
            raise ValueError(f"{self.name} holds no record {missing[0]!r}")
        return np.asarray([where[s] for s in ids], dtype=np.int64)


@dataclass
class LabelTable:
    """What the label holder holds: a label per record id, and which records it holds out."""

    ids: np.ndarray  # str (N,)
    labels: np.ndarray  # int64 (N,)
    test: np.ndarray  # bool (N,): held out for testing (whole people, under a subject split)

    def __post_init__(self) -> None:
        check_ids(self.ids.tolist(), "label holder")
        if not len(self.ids) == len(self.labels) == len(self.test):
            raise ValueError("label table columns differ in length")
        self.labels = self.labels.astype(np.int64, copy=False)


@dataclass
class VerticalData:
    """A vertical federation's data: the owners' tables and the label holder's table."""

    owners: list[OwnerTable]
    labels: LabelTable
    input_shape: tuple[int, int, int]
    name: str = "data"
    split: str = "subject"
    # For tests and reference runs only (no party has this): record id -> row of the source set.
    source_rows: dict[str, int] = field(default_factory=dict)
    # Multi-view data (`splitfed.data.views`): the camera angle each owner holds; else empty.
    views: list[str] = field(default_factory=list)

    @property
    def boxes(self) -> list[Box]:
        return [o.box for o in self.owners]

    def true_intersection(self) -> set[str]:
        common = set(self.labels.ids.tolist())
        for o in self.owners:
            common &= set(o.ids.tolist())
        return common


def vertical_partition(
    ds: EmotionDataset,
    cfg: VerticalConfig,
    split: SplitKind | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> VerticalData:
    """Share `ds` vertically among cfg.owners owners and a label holder.

    The test records are the same people every other algorithm tests on (the shared split with
    the same seed). Each party misses a record with a probability chosen so that the expected
    share held by all is `cfg.overlap`, and holds `cfg.extra` records of people no one else has.
    """
    if len(ds) == 0:
        raise UserError(f"data set {ds.name!r} is empty")
    split = split or ("subject" if ds.has_subjects else "random")
    _, test_idx, _ = shard_indices(ds.labels, ds.subjects, 1, "iid", split, seed, ds.name)
    is_test = np.zeros(len(ds), dtype=bool)
    is_test[test_idx] = True
    ids = record_ids(ds)
    _, h, w = ds.input_shape
    boxes = part_boxes(cfg.owners, h, w, cfg.align)
    rng = np.random.default_rng([cfg.seed, seed, 0x7E27])
    parties = cfg.owners + 1
    keep_p = cfg.overlap ** (1.0 / parties)
    n_extra = int(round(cfg.extra * len(ds)))

    def extra_ids(party: int) -> np.ndarray:
        return np.asarray(
            [f"x{party:02d}-{k:06d}-{rng.integers(2**32):08x}" for k in range(n_extra)]
        )

    owners: list[OwnerTable] = []
    for k, box in enumerate(boxes):
        rows = np.flatnonzero(rng.random(len(ds)) < keep_p)
        others = rng.integers(0, len(ds), n_extra)  # parts of pictures of people outside the study
        all_ids = np.concatenate([ids[rows], extra_ids(k)])
        images = crop_part(np.concatenate([ds.images[rows], ds.images[others]]), box)
        order = rng.permutation(len(all_ids))  # each party stores its rows in its own order
        owners.append(OwnerTable(f"owner-{k}", all_ids[order], images[order], box))
    rows = np.flatnonzero(rng.random(len(ds)) < keep_p)
    lab_ids = np.concatenate([ids[rows], extra_ids(cfg.owners)])
    lab = np.concatenate([ds.labels[rows], rng.integers(0, 7, n_extra)])
    test = np.concatenate([is_test[rows], rng.random(n_extra) < test_fraction])
    order = rng.permutation(len(lab_ids))
    labels = LabelTable(lab_ids[order], lab[order], test[order])
    data = VerticalData(
        owners, labels, ds.input_shape, ds.name, split, {s: i for i, s in enumerate(ids.tolist())}
    )
    check_overlap(data)
    return data


def check_overlap(data: VerticalData) -> None:
    """Refuse a federation whose parties share no records (they hold different people)."""
    common = set(data.labels.ids.tolist())
    for o in data.owners:
        if not common & set(o.ids.tolist()):
            raise UserError(
                f"{o.name} shares no record id with the label holder and the owners before "
                "it: the partitions are of different people"
            )
        common &= set(o.ids.tolist())


# ---- batches over aligned records, the same on every owner and at the label holder --------------


def batch_plan(
    n: int, batch_size: int, key: tuple[int, ...], epochs: int = 1
) -> list[tuple[int, np.ndarray]]:
    """(epoch, row positions) of each training batch, drawn as `iterate_batches` draws them."""
    plan = []
    for epoch in range(epochs):
        order = np.random.default_rng([*key, epoch]).permutation(n)
        plan += [
            (epoch, order[b * batch_size : (b + 1) * batch_size])
            for b in range(num_batches(n, batch_size))
        ]
    return plan


@dataclass
class PartAugment:
    """One batch's augmentation, drawn per record; the same on every owner for the same batch."""

    flip: torch.Tensor  # bool (n,): mirrored
    dy: torch.Tensor  # int (n,): shift down, minus max_shift
    dx: torch.Tensor  # int (n,)
    gain: torch.Tensor  # (n, 1, 1, 1) contrast
    bias: torch.Tensor  # (n, 1, 1, 1) brightness


def draw_augment(n: int, gen: torch.Generator, mirror: bool, max_shift: int = 4) -> PartAugment:
    """The draws of one batch. Every party draws all of them, in the same order, from a generator
    with the same seed, so the owners (and the label holder, which needs only the mirror flags)
    stay in step without sending anything."""
    flip = torch.rand(n, generator=gen) < 0.5
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    gain = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    bias = 0.3 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    return PartAugment(flip if mirror else torch.zeros_like(flip), dy, dx, gain, bias)


def augment_part(x: torch.Tensor, aug: PartAugment, max_shift: int = 4) -> torch.Tensor:
    """Mirror, shift and brightness/contrast of one owner's parts.

    Each record gets the same draws in every part, as if the whole crop had been changed. A
    mirrored part belongs where its mirror image lies: the trunk puts its map there (so mirroring
    needs a layout that is symmetric left to right).
    """
    n, c, h, w = x.shape
    x = torch.where(aug.flip[:, None, None, None], x.flip(-1), x)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    rows = (aug.dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (aug.dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    x = padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]
    return x * aug.gain + aug.bias


def _generators(key: tuple[int, ...]) -> Iterator[tuple[int, torch.Generator]]:
    gen = torch.Generator()
    epoch = 0
    while True:
        gen.manual_seed(int(np.random.default_rng([*key, epoch, 7]).integers(2**62)))
        yield epoch, gen
        epoch += 1


def part_batches(
    images: np.ndarray,
    batch_size: int,
    key: tuple[int, ...],
    epochs: int = 1,
    augment: bool = True,
    mirror: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(parts, mirror flags) of each training batch of one owner, in the shared batch plan."""
    gens = _generators(key)
    current, gen = next(gens)
    for epoch, idx in batch_plan(len(images), batch_size, key, epochs):
        while current != epoch:
            current, gen = next(gens)
        x = to_tensor(images[idx])
        if not augment:
            yield x, torch.zeros(len(idx), dtype=torch.bool)
            continue
        aug = draw_augment(len(idx), gen, mirror)
        yield augment_part(x, aug), aug.flip


def batch_flips(
    n: int, batch_size: int, key: tuple[int, ...], epochs: int, augment: bool, mirror: bool
) -> list[torch.Tensor]:
    """The mirror flags of each batch, replayed by the label holder without any pixels."""
    gens = _generators(key)
    current, gen = next(gens)
    out = []
    for epoch, idx in batch_plan(n, batch_size, key, epochs):
        while current != epoch:
            current, gen = next(gens)
        if augment:
            out.append(draw_augment(len(idx), gen, mirror).flip)
        else:
            out.append(torch.zeros(len(idx), dtype=torch.bool))
    return out
