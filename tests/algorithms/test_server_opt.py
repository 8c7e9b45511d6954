"""Server optimizers (FedAvgM, FedAdam): the maths, SFLV1 = FedAvg under them, and resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from splitfed.algorithms.server_opt import server_step
from splitfed.algorithms.sflv1 import SFLV1
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.model import ModelConfig
from splitfed.simulate import SimSpec, simulate

X = {"w": np.array([1.0, 2.0], dtype=np.float32), "bn.running_mean": np.zeros(2, np.float32)}
AGG = {"w": np.array([2.0, 0.0], dtype=np.float32), "bn.running_mean": np.ones(2, np.float32)}
PARAMS = {"w"}


def test_none_is_the_aggregate_itself() -> None:
    state: dict[str, torch.Tensor] = {}
    out = server_step(X, AGG, PARAMS, state, "client.", "none", 1.0, 0.9)
    assert all(out[k] is AGG[k] for k in AGG) and state == {}


def test_momentum_carries_past_rounds() -> None:
    state: dict[str, torch.Tensor] = {}
    first = server_step(X, AGG, PARAMS, state, "client.", "momentum", 1.0, 0.5)
    np.testing.assert_allclose(first["w"], AGG["w"])  # v = delta on the first round
    # The same pseudo-gradient again moves 1.5 times as far: 0.5 of the last step carried over.
    again = server_step(X, AGG, PARAMS, state, "client.", "momentum", 1.0, 0.5)
    np.testing.assert_allclose(again["w"], X["w"] + 1.5 * (AGG["w"] - X["w"]))
    np.testing.assert_array_equal(again["bn.running_mean"], AGG["bn.running_mean"])  # buffer
    assert again["w"].dtype == np.float32
    assert int(state["client..t"]) == 2


def test_adam_steps_each_weight_by_about_the_server_lr() -> None:
    state: dict[str, torch.Tensor] = {}
    out = server_step(X, AGG, PARAMS, state, "h", "adam", 0.1, 0.9, beta2=0.99, tau=1e-6)
    # Bias-corrected first step: m_hat = delta, v_hat = delta^2, so the step is lr * sign(delta).
    np.testing.assert_allclose(out["w"], X["w"] + 0.1 * np.sign(AGG["w"] - X["w"]), atol=1e-5)
    assert {"h.m.w", "h.v.w", "h.t"} <= set(state)


def test_halves_keep_separate_state() -> None:
    state: dict[str, torch.Tensor] = {}
    server_step(X, AGG, PARAMS, state, "client.", "momentum", 1.0, 0.9)
    server_step(X, AGG, PARAMS, state, "server.", "momentum", 1.0, 0.9)
    assert int(state["client..t"]) == 1 and int(state["server..t"]) == 1


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError):
        server_step(X, AGG, PARAMS, {}, "h", "lion", 1.0, 0.9)


def run(ds: EmotionDataset, algo: str, opt: str, rounds: int = 3) -> dict:  # type: ignore[type-arg]
    spec = SimSpec(
        algo, 3, rounds, seed=7,
        train=TrainConfig(batch_size=16),
        model=ModelConfig(widths=(8, 16, 16), cut=1),
        aggregation=AggregationConfig(server_opt=opt),  # type: ignore[arg-type]
    )  # fmt: skip
    return simulate(ds, spec)


def trajectory(m: dict) -> list[tuple[float, float]]:  # type: ignore[type-arg]
    return [(r["train_loss"], r["test_accuracy"]) for r in m["rounds"]]


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_sflv1_equals_fedavg_under_a_server_optimizer(
    small_synth: EmotionDataset, opt: str
) -> None:
    fedavg, sflv1 = run(small_synth, "fedavg", opt), run(small_synth, "sflv1", opt)
    np.testing.assert_allclose(trajectory(sflv1), trajectory(fedavg), rtol=0, atol=1e-6)
    assert sflv1["final"]["test_confusion"] == fedavg["final"]["test_confusion"]
    # And the optimizer is in effect: plain FedAvg takes another path.
    plain = run(small_synth, "fedavg", "none")
    assert trajectory(plain)[1:] != trajectory(fedavg)[1:]


def test_momentum_survives_a_checkpoint() -> None:
    cfg = ModelConfig(widths=(8, 16, 16), cut=1)
    algo = SFLV1(cfg, TrainConfig(), 0, AggregationConfig(server_opt="momentum"))
    copies = [{k: v + 0.1 for k, v in algo.checkpoint_tensors().items() if k.startswith("server.")}]
    server = {k[len("server.") :]: v for k, v in copies[0].items()}
    algo.average_into(algo.server_net, [server], [1.0], "server.")
    buf = io.BytesIO()
    torch.save(algo.state(), buf)  # as checkpoint.py writes state.pt
    buf.seek(0)
    resumed = SFLV1(cfg, TrainConfig(), 0, AggregationConfig(server_opt="momentum"))
    resumed.load_state(torch.load(buf, weights_only=True))
    assert resumed.server_opt_state.keys() == algo.server_opt_state.keys()
    for k, v in algo.server_opt_state.items():
        assert torch.equal(resumed.server_opt_state[k], v)
