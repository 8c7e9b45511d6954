"""Partitions, splits and the user errors around them."""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.data.dataset import train_test_split
from splitfed.data.partition import client_shards, partition_indices
from splitfed.errors import UserError


def test_subject_split_keeps_people_apart(small_synth) -> None:
    train, test = train_test_split(small_synth, "subject", seed=1)
    assert not set(train.subjects) & set(test.subjects)
    assert len(train) + len(test) == len(small_synth)


def test_subject_partition_gives_whole_people(small_synth) -> None:
    parts = partition_indices(small_synth, 3, "subject", seed=0)
    owners = [set(small_synth.subjects[p]) for p in parts]
    assert all(owners) and not (owners[0] & owners[1]) and not (owners[1] & owners[2])
    assert sum(len(p) for p in parts) == len(small_synth)


def test_dirichlet_skews_labels(small_synth) -> None:
    parts = partition_indices(small_synth, 2, "dirichlet:0.1", seed=0)
    hist = [np.bincount(small_synth.labels[p], minlength=7) / len(p) for p in parts]
    assert np.abs(hist[0] - hist[1]).sum() > 0.3


def test_client_shards_pool_to_the_test_set(small_synth) -> None:
    _, test, shards = client_shards(small_synth, 3, seed=5)
    assert sum(len(t) for _, t in shards) == len(test)
    again = client_shards(small_synth, 3, seed=5)[2]
    assert all(np.array_equal(a[0].images, b[0].images) for a, b in zip(shards, again))


@pytest.mark.parametrize(
    ("n", "spec", "match"),
    [
        (50, "subject", "only 12 subjects"),
        (3, "bogus", "unknown partition"),
        (3, "dirichlet:-1", "positive alpha"),
    ],
)
def test_partition_errors(small_synth, n: int, spec: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        partition_indices(small_synth, n, spec, seed=0)
