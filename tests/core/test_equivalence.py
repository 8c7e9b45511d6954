"""The split changes no arithmetic: the strongest tests of the federation code.

- split learning and SFLV2 with one client equal centralized training, step for step;
- SFLV1 equals FedAvg with the same batches and optimizers, for several clients;
- the same seed gives the same numbers run after run.
"""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.config import TrainConfig, round_lr
from splitfed.model import ModelConfig
from splitfed.simulate import SimSpec, simulate

ROUNDS = 2


def run(ds, algo: str, clients: int, spec: dict | None = None, **train: object) -> dict:  # type: ignore[no-untyped-def, type-arg]
    spec = SimSpec(
        algo,
        clients,
        ROUNDS,
        seed=7,
        train=TrainConfig(**{"batch_size": 16, **train}),
        **{"model": ModelConfig(widths=(8, 16, 16), cut=1), **(spec or {})},
    )
    return simulate(ds, spec)


def trajectory(m: dict) -> list[tuple[float, float, float]]:  # type: ignore[type-arg]
    return [(r["train_loss"], r["train_accuracy"], r["test_accuracy"]) for r in m["rounds"]]


@pytest.mark.parametrize("algo", ["sl", "sflv2", "sflv1", "fedavg"])
def test_one_client_equals_centralized(small_synth, algo: str) -> None:
    central = run(small_synth, "centralized", 1)
    split = run(small_synth, algo, 1)
    np.testing.assert_allclose(trajectory(split), trajectory(central), rtol=0, atol=1e-6)
    assert split["final"]["test_confusion"] == central["final"]["test_confusion"]
    # It learned something, so the equality is not that of two untrained models.
    assert central["rounds"][-1]["train_loss"] < central["rounds"][0]["train_loss"]


@pytest.mark.parametrize("algo", ["sl", "sflv2", "sflv1", "fedavg"])
def test_one_client_equals_centralized_with_cut_rounds(small_synth, algo: str) -> None:
    """Averaging three times a round (`syncs_per_round`) cuts each device's round into parts
    with the uncut round's batches and seeds: with one device, still centralized training."""
    central = run(small_synth, "centralized", 1)
    split = run(small_synth, algo, 1, syncs_per_round=3)
    np.testing.assert_allclose(trajectory(split), trajectory(central), rtol=0, atol=1e-6)
    assert split["final"]["test_confusion"] == central["final"]["test_confusion"]
    assert [r["samples"] for r in split["rounds"]] == [r["samples"] for r in central["rounds"]]


# 12 parts: more than the devices' batches a round, so some parts of each device are empty.
@pytest.mark.parametrize(
    ("optimizer", "syncs"), [("adam", 1), ("sgd", 1), ("adam", 3), ("adam", 12)]
)
def test_sflv1_equals_fedavg(small_synth, optimizer: str, syncs: int) -> None:
    lr = 0.01 if optimizer == "sgd" else 2e-3
    fedavg = run(small_synth, "fedavg", 3, optimizer=optimizer, lr=lr, syncs_per_round=syncs)
    sflv1 = run(small_synth, "sflv1", 3, optimizer=optimizer, lr=lr, syncs_per_round=syncs)
    np.testing.assert_allclose(trajectory(sflv1), trajectory(fedavg), rtol=0, atol=1e-6)
    assert sflv1["final"]["test_confusion"] == fedavg["final"]["test_confusion"]


def test_warm_up_climbs_to_the_peak_then_the_schedule_runs_over_the_rest() -> None:
    cfg = TrainConfig(lr=1.0, warmup_rounds=2)
    lrs = [round_lr(cfg, r, 10) for r in range(10)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # cosine over 8 rounds
    assert lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))
    flat = cfg.model_copy(update={"schedule": "constant"})
    assert [round_lr(flat, r, 10) for r in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    # A run too short for its warm-up still reaches the peak in its last round.
    assert [round_lr(cfg, r, 2) for r in range(2)] == pytest.approx([0.5, 1.0])
    assert round_lr(cfg, 0, 1) == 1.0


def test_warm_up_keeps_the_split_arithmetic(small_synth) -> None:
    """The warm-up sets every copy's learning rate alike: SL with one client is still
    centralized training and SFLV1 still FedAvg, and the warm-up did change the run."""
    central = run(small_synth, "centralized", 1, warmup_rounds=1)
    sl = run(small_synth, "sl", 1, warmup_rounds=1)
    np.testing.assert_allclose(trajectory(sl), trajectory(central), rtol=0, atol=1e-6)
    fedavg = run(small_synth, "fedavg", 3, warmup_rounds=1, syncs_per_round=3)
    sflv1 = run(small_synth, "sflv1", 3, warmup_rounds=1, syncs_per_round=3)
    np.testing.assert_allclose(trajectory(sflv1), trajectory(fedavg), rtol=0, atol=1e-6)
    cold = run(small_synth, "centralized", 1, warmup_rounds=0)
    assert trajectory(cold)[0] != trajectory(central)[0]


@pytest.mark.parametrize("algo", ["sflv1", "sflv2"])
def test_cut_rounds_train_every_batch_once_and_average_more(small_synth, algo: str) -> None:
    """Several devices: the cut trains the same samples per round, and its averages between
    the parts change the trajectory (the test above would pass if the cut were ignored). With
    more parts than a device has batches, its empty parts leave it out of those averages and
    the round still completes with every device."""
    whole = run(small_synth, algo, 3, syncs_per_round=1)
    for syncs in (2, 12):
        cut = run(small_synth, algo, 3, syncs_per_round=syncs)
        assert [r["samples"] for r in cut["rounds"]] == [r["samples"] for r in whole["rounds"]]
        assert [len(r["clients"]) for r in cut["rounds"]] == [3] * ROUNDS
        assert trajectory(cut) != trajectory(whole)


@pytest.mark.parametrize("algo", ["sflv1", "sflv2", "sl", "fedavg"])
def test_a_device_sits_out_its_empty_parts_and_no_number_changes(
    small_synth, algo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 parts over about 3 batches a device: 9 parts of each round are empty for it. It sits
    them out (`Strategy.part_participants`), so its half does not travel down and back for
    nothing, and the run is the one where every part reaches every device, bit for bit."""
    from splitfed.algorithms.base import Strategy

    # Whole batches: a shared one (`split_batch`) gives each device about 3 times as many.
    skipping = run(small_synth, algo, 3, syncs_per_round=12, split_batch=False)
    with monkeypatch.context() as m:
        m.setattr(Strategy, "part_participants", lambda self, io, participants: participants)
        everyone = run(small_synth, algo, 3, syncs_per_round=12, split_batch=False)
    assert trajectory(skipping) == trajectory(everyone)
    assert skipping["final"]["test_confusion"] == everyone["final"]["test_confusion"]
    assert [r["clients"] for r in skipping["rounds"]] == [r["clients"] for r in everyone["rounds"]]
    # Each empty part had carried the client half down (the whole model for FedAvg).
    assert skipping["comm"]["bytes_down"] < 0.95 * everyone["comm"]["bytes_down"]
    assert skipping["comm"]["bytes_up"] < everyone["comm"]["bytes_up"]


@pytest.mark.parametrize("algo", ["sflv1", "sflv2", "sl"])
def test_devices_side_by_side_share_the_batch(small_synth, algo: str) -> None:
    """With `split_batch` (the default) each of 3 devices that train copies side by side steps
    on round(16 / 3) = 5 pictures: the very run of batch 5 without it. FedAvg splits as SFLV1
    does (`test_sflv1_equals_fedavg` runs with the default). SL relays one model from device
    to device, which already takes every batch in turn, so it keeps the whole batch; so does
    one device (the tests above: still centralized training)."""
    shared = run(small_synth, algo, 3, syncs_per_round=3)
    whole = run(small_synth, algo, 3, syncs_per_round=3, split_batch=False)
    fifth = run(small_synth, algo, 3, syncs_per_round=3, batch_size=5, split_batch=False)
    if algo == "sl":
        assert trajectory(shared) == trajectory(whole)
        return
    assert trajectory(shared) == trajectory(fifth)
    assert shared["final"]["test_confusion"] == fifth["final"]["test_confusion"]
    assert trajectory(shared) != trajectory(whole)
    assert [r["samples"] for r in shared["rounds"]] == [r["samples"] for r in fifth["rounds"]]


@pytest.mark.parametrize(("clients", "shape"), [(2, "standard"), (4, "standard"), (2, "u")])
def test_sflv2_in_lockstep_steps_its_server_half_as_sflv1_averages_its_copies(
    small_synth, clients: int, shape: str
) -> None:
    """In lockstep SFLV2's one server half steps once on the devices' i-th batches, on their
    mean gradient; SFLV1 steps a copy per device on each batch and averages the copies. With
    plain SGD (no momentum, whose buffers SFLV1 keeps per copy), an average after every batch
    and devices of equal size (so SFLV1's weights by pictures held are the batch weights),
    that is one arithmetic. The interleaved order steps once per device batch and is not.
    U-shaped, the server half's features step in lockstep and the devices' heads as SFLV1's."""
    kw = {"optimizer": "sgd", "momentum": 0.0, "lr": 1e-3, "syncs_per_round": 16}
    model = ModelConfig(widths=(8, 16, 16), cut=1, shape=shape)  # type: ignore[arg-type]
    iid = {"partition": "iid", "model": model}  # 140 training pictures: equal devices
    lockstep = run(small_synth, "sflv2", clients, spec=iid, **kw)  # the default order
    sflv1 = run(small_synth, "sflv1", clients, spec=iid, **kw)
    interleaved = run(small_synth, "sflv2", clients, sflv2_order="interleaved", spec=iid, **kw)
    train = [(r["train_loss"], r["train_accuracy"]) for r in lockstep["rounds"]]
    np.testing.assert_allclose(
        train, [(r["train_loss"], r["train_accuracy"]) for r in sflv1["rounds"]], atol=1e-6
    )
    other = [(r["train_loss"], r["train_accuracy"]) for r in interleaved["rounds"]]
    assert np.abs(np.subtract(train, other)).max() > 1e-4
    assert [r["samples"] for r in lockstep["rounds"]] == [r["samples"] for r in sflv1["rounds"]]


def test_the_shared_batch_never_falls_below_two() -> None:
    cfg = TrainConfig(batch_size=16)
    assert [cfg.device_batch(k) for k in (1, 2, 3, 5, 10, 40)] == [16, 8, 5, 3, 2, 2]
    assert cfg.model_copy(update={"split_batch": False}).device_batch(5) == 16


def test_algorithms_differ_with_several_clients(small_synth) -> None:
    """Guard against an equivalence test that passes because everything is the same code path."""
    a = trajectory(run(small_synth, "sflv1", 3))
    b = trajectory(run(small_synth, "sflv2", 3))
    c = trajectory(run(small_synth, "sl", 3))
    assert a != b and b != c and a != c


def test_same_seed_same_numbers(small_synth) -> None:
    first = run(small_synth, "sflv2", 2)
    second = run(small_synth, "sflv2", 2)
    assert trajectory(first) == trajectory(second)
    # Byte counts match but for the envelopes' timestamps and message ids (a few bytes a message).
    assert (
        abs(first["comm"]["bytes_up"] - second["comm"]["bytes_up"])
        < 1e-3 * first["comm"]["bytes_up"]
    )
