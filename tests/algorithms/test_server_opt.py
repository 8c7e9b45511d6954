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
from splitfed.training import state_to_numpy

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


def test_sgd_scales_the_step_and_keeps_no_momentum() -> None:
    state: dict[str, torch.Tensor] = {}
    for _ in range(2):  # the same step twice: nothing carried over
        out = server_step(X, AGG, PARAMS, state, "client.", "sgd", 3.0, 0.9)
        np.testing.assert_allclose(out["w"], X["w"] + 3.0 * (AGG["w"] - X["w"]))
    np.testing.assert_array_equal(out["bn.running_mean"], AGG["bn.running_mean"])
    assert out["w"].dtype == np.float32
    assert set(state) == {"client..t"}


def test_auto_server_lr_is_the_number_of_copies() -> None:
    assert AggregationConfig(server_opt="sgd").server_lr_for(5) == 5.0  # sgd's default: auto
    assert AggregationConfig(server_opt="momentum", server_lr="auto").server_lr_for(3) == 3.0
    assert AggregationConfig(server_opt="momentum").server_lr_for(3) == 1.0
    assert AggregationConfig(server_opt="adam").server_lr_for(3) == 0.01
    assert AggregationConfig(server_opt="sgd", server_lr=2.0).server_lr_for(7) == 2.0
    with pytest.raises(ValueError):
        AggregationConfig(server_lr=0.0)
    sqrt = AggregationConfig(server_opt="sgd", server_lr="sqrt")
    assert [sqrt.server_lr_for(k) for k in (1, 4, 10)] == [1.0, 2.0, 10**0.5]
    with pytest.raises(ValueError):
        AggregationConfig(server_lr="twice")  # type: ignore[arg-type]


def test_auto_step_is_the_sum_of_the_updates() -> None:
    """Two copies, equal weights: the global half moves by the sum of the two deltas."""
    cfg = ModelConfig(widths=(8, 16, 16), cut=1)
    algo = SFLV1(cfg, TrainConfig(), 0, AggregationConfig(server_opt="sgd"))
    start = {k: v.copy() for k, v in state_to_numpy(algo.client_net).items()}
    rng = np.random.default_rng(0)
    copies = [{k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in start.items()}
              for _ in range(2)]  # fmt: skip
    algo.average_into(algo.client_net, copies, [1.0, 1.0], "client.")
    now = state_to_numpy(algo.client_net)
    params = {name for name, _ in algo.client_net.named_parameters()}
    for k in params:
        expect = start[k] + (copies[0][k] - start[k]) + (copies[1][k] - start[k])
        np.testing.assert_allclose(now[k], expect, rtol=0, atol=1e-6)
    assert algo.aggregation.server_lr is None  # the round's lr is not left behind


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


def run(
    ds: EmotionDataset,
    algo: str,
    opt: str,
    rounds: int = 3,
    lr: str | None = None,
    clients: int = 3,
) -> dict:  # type: ignore[type-arg]
    spec = SimSpec(
        algo, clients, rounds, seed=7,
        train=TrainConfig(batch_size=16),
        model=ModelConfig(widths=(8, 16, 16), cut=1),
        aggregation=AggregationConfig(server_opt=opt, server_lr=lr),  # type: ignore[arg-type]
    )  # fmt: skip
    return simulate(ds, spec)


def trajectory(m: dict) -> list[tuple[float, float]]:  # type: ignore[type-arg]
    return [(r["train_loss"], r["test_accuracy"]) for r in m["rounds"]]


@pytest.mark.parametrize("opt", ["sgd", "sgd:sqrt", "momentum", "adam"])
def test_sflv1_equals_fedavg_under_a_server_optimizer(
    small_synth: EmotionDataset, opt: str
) -> None:
    opt, _, lr = opt.partition(":")
    fedavg = run(small_synth, "fedavg", opt, lr=lr or None)
    sflv1 = run(small_synth, "sflv1", opt, lr=lr or None)
    np.testing.assert_allclose(trajectory(sflv1), trajectory(fedavg), rtol=0, atol=1e-6)
    assert sflv1["final"]["test_confusion"] == fedavg["final"]["test_confusion"]
    # And the optimizer is in effect: plain FedAvg takes another path.
    plain = run(small_synth, "fedavg", "none")
    assert trajectory(plain)[1:] != trajectory(fedavg)[1:]


@pytest.mark.parametrize("algo", ["sflv1", "sflv2"])
def test_sqrt_server_lr_with_one_client_is_the_plain_average(
    small_synth: EmotionDataset, algo: str
) -> None:
    """The root of one copy is 1: the step is the copy itself, so one client still trains as
    centralized does (`test_equivalence`), bit for bit."""
    plain = run(small_synth, algo, "none", rounds=2, clients=1)
    for lr in ("sqrt", "auto"):
        stepped = run(small_synth, algo, "sgd", rounds=2, lr=lr, clients=1)
        assert trajectory(stepped) == trajectory(plain), lr
        assert stepped["final"]["test_confusion"] == plain["final"]["test_confusion"], lr
    # With three clients the root is not 1, and the run takes another path.
    assert (
        trajectory(run(small_synth, algo, "sgd", rounds=2, lr="sqrt"))[1:]
        != trajectory(run(small_synth, algo, "none", rounds=2))[1:]
    )


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


def test_fedsl_runs_under_the_server_optimizer_it_is_given(small_synth: EmotionDataset) -> None:
    """simulate hands FedSL the run's aggregation (it used to build FedSL without one, so
    --server-opt and --aggregation were silently ignored for it)."""
    plain = simulate(small_synth, SimSpec("fedsl", 2, 2, seed=7, train=TrainConfig(batch_size=16)))
    stepped = simulate(small_synth, SimSpec(
        "fedsl", 2, 2, seed=7, train=TrainConfig(batch_size=16),
        aggregation=AggregationConfig(server_opt="sgd", server_lr=0.25),
    ))  # fmt: skip
    assert trajectory(plain)[0] == trajectory(stepped)[0]  # the first round trains from one start
    assert trajectory(plain)[1:] != trajectory(stepped)[1:]
