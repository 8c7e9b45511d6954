"""Pure aggregation arithmetic."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from splitfed.algorithms.aggregate import interleaved_order, weighted_average


def test_weighted_average_weights_by_samples() -> None:
    a = {"w": np.array([0.0, 10.0], np.float32), "n": np.array(4, np.int64)}
    b = {"w": np.array([10.0, 20.0], np.float32), "n": np.array(8, np.int64)}
    out = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(out["w"], [7.5, 17.5])
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64 and int(out["n"]) == 7


def test_weighted_average_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([{"a": np.zeros(1)}, {"b": np.zeros(1)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_average([{"a": np.zeros(1)}], [0])


def test_interleaved_order_keeps_counts_and_mixes() -> None:
    order = interleaved_order([3, 5, 2], np.random.default_rng(0))
    assert Counter(order) == {0: 3, 1: 5, 2: 2}
    assert order != sorted(order)
    assert interleaved_order([4], np.random.default_rng(0)) == [0, 0, 0, 0]
    assert order == interleaved_order([3, 5, 2], np.random.default_rng(0))
