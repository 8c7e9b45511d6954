"""Pure aggregation arithmetic."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from splitfed.algorithms.aggregate import (
    interleaved_order,
    lockstep_order,
    sequential_order,
    weighted_average,
)


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


def test_sequential_order_serves_each_client_in_one_run() -> None:
    counts = [3, 5, 2]
    order = sequential_order(counts, np.random.default_rng(0))
    assert sorted(order) == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    runs = [k for i, k in enumerate(order) if i == 0 or order[i - 1] != k]
    assert sorted(runs) == [0, 1, 2]  # one contiguous run per client
    orders = {tuple(sequential_order(counts, np.random.default_rng(s))) for s in range(20)}
    assert len(orders) > 1  # the client order is drawn, not fixed


def test_lockstep_order_groups_the_clients_ith_batches() -> None:
    groups = lockstep_order([3, 5, 2], np.random.default_rng(0))
    assert [sorted(g) for g in groups] == [[0, 1, 2], [0, 1, 2], [0, 1], [1], [1]]
    firsts = {tuple(lockstep_order([3, 5, 2], np.random.default_rng(s))[0]) for s in range(20)}
    assert len(firsts) > 1  # the order within a group is drawn, not fixed
    assert lockstep_order([4], np.random.default_rng(0)) == [[0], [0], [0], [0]]
    assert lockstep_order([0, 0], np.random.default_rng(0)) == []


def test_sflv2_orders_differ_but_one_client_is_the_same(small_synth) -> None:  # type: ignore[no-untyped-def]
    from splitfed.config import TrainConfig
    from splitfed.simulate import SimSpec, simulate

    def run(order: str, clients: int) -> list[float]:
        # One average a round: with more parts each holds one batch a client or none, and
        # the two orders of so few batches can coincide.
        train = TrainConfig(batch_size=16, sflv2_order=order, syncs_per_round=1)  # type: ignore[arg-type]
        m = simulate(small_synth, SimSpec("sflv2", clients, 1, seed=2, train=train))
        return [r["train_loss"] for r in m["rounds"]]

    assert run("sequential", 1) == run("interleaved", 1) == run("lockstep", 1)
    assert len({tuple(run(order, 3)) for order in ("sequential", "interleaved", "lockstep")}) == 3
