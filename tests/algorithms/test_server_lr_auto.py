"""`server_lr: auto` is the number of copies averaged that round for every algorithm, not only
the split CNN's: `Strategy.average_into` steps FedSL's segments (and any other half) by it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from torch import nn

from splitfed.algorithms.base import Strategy
from splitfed.algorithms.fedsl import FedSL, SeqModelConfig
from splitfed.algorithms.pyvertical import VerticalModelConfig
from splitfed.algorithms.pyvertical.strategy import PyVertical
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.vertical import LabelTable
from splitfed.model import ModelConfig
from splitfed.training import state_to_numpy


def fedsl() -> tuple[Strategy, nn.Module]:
    cfg = SeqModelConfig(
        frame_shape=(1, 24, 48), frames=4, segments=2, widths=(4, 8), features=16, hidden=8
    )
    algo = FedSL(cfg, TrainConfig(), 0)
    return algo, algo.segments[0]


def pyvertical() -> tuple[Strategy, nn.Module]:
    split = ModelConfig(input_shape=(1, 24, 48), widths=(4, 8, 8, 8), cut=2)
    cfg = VerticalModelConfig(split=split, boxes=[(0, 24, 0, 24), (0, 24, 24, 48)])
    labels = LabelTable(np.asarray(["r1", "r2"]), np.asarray([0, 1]), np.asarray([False, False]))
    algo = PyVertical(cfg, TrainConfig(), 0, labels)
    return algo, algo.trunk


ALGOS: dict[str, Callable[[], tuple[Strategy, nn.Module]]] = {
    "fedsl": fedsl,
    "pyvertical": pyvertical,
}


def step(
    make: Callable[[], tuple[Strategy, nn.Module]], agg: AggregationConfig, n: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], set[str]]:
    """Average n hand-made copies (unequal weights) into the algorithm's half; return the
    reference, the weighted mean of the copies, the half after the step, its parameters."""
    algo, net = make()
    algo.aggregation = agg  # FedSL and PyVertical take no AggregationConfig of their own
    ref = {k: v.copy() for k, v in state_to_numpy(net).items()}
    rng = np.random.default_rng(1)
    copies = [
        {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in ref.items()}
        for _ in range(n)
    ]
    weights = [float(w) for w in range(1, n + 1)]
    mean = {
        k: sum(w * c[k].astype(np.float64) for w, c in zip(weights, copies, strict=True))
        / sum(weights)
        for k in ref
        if np.issubdtype(ref[k].dtype, np.floating)
    }
    algo.average_into(net, copies, weights, "seg0")
    params = {name for name, _ in net.named_parameters()}
    assert algo.aggregation is agg  # the round's lr is not left behind
    return ref, mean, state_to_numpy(net), params


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("server_lr", ["auto", None])  # None: sgd's default is auto
def test_auto_sgd_steps_by_the_number_of_copies(name: str, server_lr: str | None) -> None:
    n = 3
    agg = AggregationConfig(server_opt="sgd", server_lr=server_lr)
    ref, mean, now, params = step(ALGOS[name], agg, n)
    assert params
    for k in params:
        expect = ref[k] + n * (mean[k] - ref[k])
        np.testing.assert_allclose(now[k], expect, rtol=0, atol=1e-5, err_msg=f"{name} {k}")
    for k in mean.keys() - params:  # buffers take the aggregate as is
        np.testing.assert_allclose(now[k], mean[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(ALGOS))
def test_a_set_server_lr_does_not_depend_on_the_copies(name: str) -> None:
    agg = AggregationConfig(server_opt="sgd", server_lr=0.5)
    ref, mean, now, params = step(ALGOS[name], agg, 3)
    for k in params:
        np.testing.assert_allclose(now[k], ref[k] + 0.5 * (mean[k] - ref[k]), rtol=0, atol=1e-5)
