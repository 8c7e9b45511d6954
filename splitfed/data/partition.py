"""How a data set is shared among clients, as pure functions of (data, n, scheme, seed).

The simulator and an edge agent started with `--shard I/N` call the same function with the
same seed, so a deployed agent holds exactly the samples its simulated twin held.
"""

from __future__ import annotations

import logging

import numpy as np

from splitfed.data.dataset import EmotionDataset, SplitKind, default_split, train_test_split
from splitfed.errors import UserError

log = logging.getLogger(__name__)


def default_partition(ds: EmotionDataset) -> str:
    return "subject" if ds.has_subjects else "iid"


def parse_partition(spec: str) -> tuple[str, float]:
    if spec in ("subject", "iid"):
        return spec, 0.0
    if spec.startswith("dirichlet:"):
        try:
            alpha = float(spec.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if alpha <= 0:
            raise UserError(
                f"bad partition {spec!r}: dirichlet needs a positive alpha, e.g. dirichlet:0.5"
            )
        return "dirichlet", alpha
    raise UserError(f"unknown partition {spec!r}: use subject, iid or dirichlet:ALPHA")


def partition_indices(ds: EmotionDataset, n: int, spec: str, seed: int) -> list[np.ndarray]:
    """Indices of each client's samples; every client gets at least one sample or it is an error."""
    if n < 1:
        raise UserError("need at least one client")
    kind, alpha = parse_partition(spec)
    rng = np.random.default_rng([seed, 0xC11E])
    if kind == "subject":
        if ds.subjects is None:
            raise UserError(f"--partition subject needs subject ids, and {ds.name!r} has none")
        people = np.unique(ds.subjects)
        if n > len(people):
            raise UserError(
                f"{n} clients but only {len(people)} subjects in {ds.name!r}: use fewer clients"
            )
        people = people[rng.permutation(len(people))]
        owner = {p: i % n for i, p in enumerate(people)}
        who = np.array([owner[s] for s in ds.subjects])
        parts = [np.flatnonzero(who == i) for i in range(n)]
    elif kind == "iid":
        parts = [np.sort(p) for p in np.array_split(rng.permutation(len(ds)), n)]
    else:
        parts_l: list[list[int]] = [[] for _ in range(n)]
        for c in np.unique(ds.labels):
            idx = rng.permutation(np.flatnonzero(ds.labels == c))
            share = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts_l[i].extend(chunk.tolist())
        parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts_l]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise UserError(
            f"client(s) {empty} left with no samples under --partition {spec}: use fewer clients"
        )
    return parts


def client_shards(
    ds: EmotionDataset,
    n: int,
    partition: str | None = None,
    split: SplitKind | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[EmotionDataset, EmotionDataset, list[tuple[EmotionDataset, EmotionDataset]]]:
    """(train, test, [(client train, client held-out)...]) for n clients.

    The held-out people are dealt among the clients in contiguous runs, so the clients' held-out
    sets together are exactly the test set: their pooled counts give the same accuracy as the
    aggregator evaluating the test set itself.
    """
    split = split or default_split(ds)
    partition = partition or default_partition(ds)
    train, test = train_test_split(ds, split, test_fraction, seed)
    parts = partition_indices(train, n, partition, seed)
    if test.subjects is not None:
        order = np.argsort(test.subjects, kind="stable")
    else:
        order = np.arange(len(test))
    test_parts = np.array_split(order, n)
    shards = [
        (
            train.subset(p, f"{ds.name}:client{i}"),
            test.subset(np.sort(t), f"{ds.name}:client{i}:test"),
        )
        for i, (p, t) in enumerate(zip(parts, test_parts))
    ]
    return train, test, shards
