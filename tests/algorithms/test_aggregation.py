"""Robust aggregation and sample-count caps: the pure functions, then through the strategies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from splitfed.algorithms.aggregate import (
    aggregate_states,
    clip_update,
    coordinate_median,
    max_samples,
    trimmed_mean,
    weighted_average,
)
from splitfed.checkpoint import checkpoint_file
from splitfed.client import ClientRuntime
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.batches import num_batches
from splitfed.model import ModelConfig
from splitfed.simulate import SimSpec, simulate
from tests.adversaries import (
    BadLabelRuntime,
    InflatedCountRuntime,
    NormProbeRuntime,
    PoisonRuntime,
    SilentRuntime,
)


def states(*values: float) -> list[dict[str, np.ndarray]]:
    return [
        {"w": np.full((2, 3), v, dtype=np.float32), "n": np.array(int(v), dtype=np.int64)}
        for v in values
    ]


def test_mean_is_bit_identical_to_weighted_average() -> None:
    rng = np.random.default_rng(0)
    s = [{"w": rng.normal(size=(4, 5)).astype(np.float32)} for _ in range(3)]
    w = [10, 3, 7]
    a, b = aggregate_states(s, w, method="mean"), weighted_average(s, w)
    assert a["w"].tobytes() == b["w"].tobytes()


def test_median_ignores_one_wild_copy_whatever_its_scale() -> None:
    for wild in (1e6, -1e6):
        out = coordinate_median(states(1.0, 2.0, 3.0, 4.0, wild))
        assert np.all(out["w"] == 3.0 if wild > 0 else out["w"] == 2.0)
        assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64
    # The mean does not: one copy drags it anywhere.
    mean = weighted_average(states(1.0, 2.0, 3.0, 4.0, 1e6), [1] * 5)
    assert mean["w"][0, 0] > 1e5


def test_trimmed_mean_cuts_both_ends() -> None:
    out = trimmed_mean(states(-1e6, 1.0, 2.0, 3.0, 1e6), trim=0.2)
    np.testing.assert_allclose(out["w"], 2.0)
    # trim 0 is the plain (unweighted) mean; at least one copy always stays.
    np.testing.assert_allclose(trimmed_mean(states(1.0, 3.0), 0.0)["w"], 2.0)
    np.testing.assert_allclose(trimmed_mean(states(1.0, 3.0), 0.49)["w"], 2.0)
    with pytest.raises(ValueError):
        trimmed_mean(states(1.0), 0.5)


def test_clip_update_bounds_the_distance_from_the_reference() -> None:
    ref = {"w": np.zeros((2, 2), np.float32), "n": np.array(5, np.int64)}
    far = {"w": np.full((2, 2), 30.0, np.float32), "n": np.array(9, np.int64)}  # norm 60
    out = clip_update(far, ref, 6.0)
    assert np.linalg.norm(out["w"]) == pytest.approx(6.0, rel=1e-6)
    np.testing.assert_allclose(out["w"], 3.0)  # same direction
    assert int(out["n"]) == 9  # integer buffers untouched
    near = {"w": np.full((2, 2), 1.0, np.float32), "n": np.array(9, np.int64)}
    assert clip_update(near, ref, 6.0)["w"] is near["w"]  # within the bound: unchanged
    with pytest.raises(ValueError):
        aggregate_states([far], [1], clip_norm=1.0)  # clipping needs the reference


def test_clipped_mean_limits_what_one_copy_can_do() -> None:
    ref = {"w": np.zeros(4, np.float32)}
    copies = [{"w": np.full(4, v, np.float32)} for v in (0.1, 0.2, 1e4)]
    out = aggregate_states(copies, [1, 1, 1], reference=ref, clip_norm=1.0)
    assert np.abs(out["w"]).max() < 1.0


def trained(n: int, batch: int, epochs: int) -> int:
    """Samples an honest device with n samples shows in its batches in one round."""
    per_epoch = min(n, num_batches(n, batch) * batch)
    return epochs * per_epoch


@pytest.mark.parametrize("batch", [2, 5, 16, 32])
@pytest.mark.parametrize("epochs", [1, 3])
def test_max_samples_is_the_largest_count_those_batches_allow(batch: int, epochs: int) -> None:
    for n in range(0, 130):
        seen = trained(n, batch, epochs)
        cap = max_samples(seen, epochs, batch)
        assert cap >= n, (n, seen, cap)  # an honest device is never capped
        assert trained(cap, batch, epochs) == seen  # ... and a larger claim cannot be honest
        assert trained(cap + 1, batch, epochs) != seen


# ---- through the strategies, in-process --------------------------------------------------------

# Whole batches: each device's batch is the run's, so a test can count its batches and parts.
SMALL = {"batch_size": 16, "split_batch": False}


def sim(
    ds, algo: str, clients: int = 3, rounds: int = 2, factory=None, syncs=None, split=False,
    order=None, **kw,
):  # type: ignore[no-untyped-def]  # fmt: skip
    extra = {} if syncs is None else {"syncs_per_round": syncs}
    extra["split_batch"] = split
    if order is not None:
        extra["sflv2_order"] = order
    spec = SimSpec(
        algo,
        clients,
        rounds,
        seed=7,
        train=TrainConfig(**{**SMALL, **extra}),
        model=ModelConfig(widths=(8, 16, 16), cut=1),
        runtime_factory=factory,
        **kw,
    )
    return simulate(ds, spec)


def one_of(cls: type[ClientRuntime], who: str, **kw: Any) -> Any:
    """Runtimes where `who` is a `cls` and everybody else is honest."""

    def make(cid: str, run: str, tr: Any, te: Any) -> ClientRuntime:
        return cls(cid, run, tr, te, **kw) if cid == who else ClientRuntime(cid, run, tr, te)

    return make


def trajectory(m: dict[str, Any]) -> list[tuple[float, float, float]]:
    return [(r["train_loss"], r["train_accuracy"], r["test_accuracy"]) for r in m["rounds"]]


@pytest.mark.parametrize(
    ("algo", "syncs", "split"),
    [(a, syncs, False) for a in ("sflv1", "sflv2", "fedavg") for syncs in (1, 4)]
    + [("sflv1", 4, True)],  # the cap is the base's, for every algorithm alike
)
def test_an_inflated_sample_count_is_capped(
    small_synth, algo: str, syncs: int, split: bool
) -> None:  # type: ignore[no-untyped-def]
    """One average a round: the claim is capped at what the device was seen to train. Cut
    rounds weigh each part by what the device trained in it, so the claim weighs nothing; a
    claim above the declared set is still counted, once per part the liar trains in (one per
    batch of its round, at most every part: it sits out the parts with none of its batches).
    With a shared batch (`split_batch`) the cap counts the device's own batch."""
    honest = sim(small_synth, algo, syncs=syncs, split=split)
    sizes = honest["data"]["clients_samples"]
    batch = TrainConfig(**{**SMALL, "split_batch": split}).device_batch(len(sizes))
    # With no shard a whole number of batches, the cap is exactly the honest count, so a capped
    # liar changes nothing; uncapped, its x1000 weight would own the average.
    assert all(n % batch for n in sizes), sizes
    liar = one_of(InflatedCountRuntime, "client-01")
    liar = sim(small_synth, algo, factory=liar, syncs=syncs, split=split)
    assert trajectory(liar) == trajectory(honest)
    assert liar["final"]["test_confusion"] == honest["final"]["test_confusion"]
    # one capped update a round, or a part
    parts = min(num_batches(sizes[1], batch), syncs)  # the liar is client-01
    assert liar["comm"]["rejected_messages"] == len(liar["rounds"]) * parts


@pytest.mark.parametrize(
    ("algo", "order"), [("sl", None), ("sflv2", "interleaved"), ("sflv2", "lockstep")]
)
def test_a_silent_device_is_skipped_and_the_round_goes_on(small_synth, algo: str, order) -> None:  # type: ignore[no-untyped-def]
    """In lockstep the server steps on each group without the silent device's batch."""
    factory = one_of(SilentRuntime, "client-01", round=0, answers=1)
    m = sim(small_synth, algo, factory=factory, step_timeout=5.0, syncs=1, order=order)
    first, second = m["rounds"]
    assert first["dropped"] == ["client-01"]
    assert first["clients"] == ["client-00", "client-02"]  # what the others trained is kept
    assert second["clients"] == ["client-00", "client-01", "client-02"]  # back next round
    assert first["samples"] > 0 and m["comm"]["rejected_messages"] == 1  # "step timeout"
    # Without a step timeout the silent device stalls the round: nobody completes it.
    stalled = sim(small_synth, algo, factory=factory, syncs=1, order=order)
    if order == "lockstep":  # a device whose batches all came before the stall is done
        assert "client-01" not in stalled["rounds"][0]["clients"]
        assert len(stalled["rounds"][0]["clients"]) < 2
    else:
        assert stalled["rounds"][0]["clients"] == ([] if algo == "sflv2" else ["client-00"])


def test_a_rejected_batch_in_lockstep_still_lets_its_group_step(small_synth) -> None:  # type: ignore[no-untyped-def]
    """A device's second batch is rejected (labels out of range): its group steps on the other
    devices' batches, as when the device never sent it. Each of the three devices in turn, so
    one of them is the last of its group, whose step the rejection must not hold back."""
    for who in ("client-00", "client-01", "client-02"):
        bad = sim(small_synth, "sflv2", factory=one_of(BadLabelRuntime, who, batch=1),
                  step_timeout=5.0, syncs=1, order="lockstep")  # fmt: skip
        mute = sim(small_synth, "sflv2", factory=one_of(SilentRuntime, who, answers=0),
                   step_timeout=5.0, syncs=1, order="lockstep")  # fmt: skip
        assert bad["rounds"][0]["dropped"] == mute["rounds"][0]["dropped"] == [who]
        assert trajectory(bad)[0] == trajectory(mute)[0], who
        assert bad["comm"]["rejected_messages"] == mute["comm"]["rejected_messages"] + 1


@pytest.mark.parametrize("algo", ["sl", "sflv2"])
def test_a_device_silent_in_a_part_sits_out_the_rest_of_the_round(small_synth, algo: str) -> None:  # type: ignore[no-untyped-def]
    """Cut rounds: a device dropped in a part skips the round's later parts, the others finish
    it, and the device is back the next round. Wire round 3 is round 0's last part, which
    holds at least one of every device's batches."""
    factory = one_of(SilentRuntime, "client-01", round=3, answers=0)
    m = sim(small_synth, algo, factory=factory, step_timeout=5.0, syncs=4)
    honest = sim(small_synth, algo, syncs=4)
    first, second = m["rounds"]
    assert first["dropped"] == ["client-01"]
    assert first["clients"] == ["client-00", "client-02"]
    assert second["clients"] == ["client-00", "client-01", "client-02"]
    assert honest["rounds"][0]["dropped"] == [] and len(honest["rounds"][0]["clients"]) == 3
    # It trained in the earlier parts: the round saw as many samples as the honest one, its
    # last batch included (the aggregator stepped on it; its gradient went unanswered).
    assert first["samples"] == honest["rounds"][0]["samples"]


def test_the_norm_probe_records_what_clipping_bounds_and_changes_nothing(small_synth) -> None:  # type: ignore[no-untyped-def]
    # One average a round: one client update per device and round for the probes to see.
    probes: list[NormProbeRuntime] = []

    def make(cid: str, run: str, tr: Any, te: Any) -> ClientRuntime:
        probes.append(NormProbeRuntime(cid, run, tr, te))
        return probes[-1]

    honest = sim(small_synth, "sflv1", syncs=1)
    probed = sim(small_synth, "sflv1", factory=make, syncs=1)
    assert trajectory(probed) == trajectory(honest)  # recording is all it does
    norms = [n["w"] for p in probes for n in p.norms]
    assert len(norms) == 3 * 2 and all(0 < n < np.inf for n in norms)
    # A bound no update reaches changes nothing; one under every honest client update does.
    # (SFLV1 clips the server copies too, whose updates these probes do not see.)
    above = AggregationConfig(clip_update_norm=1e6)
    assert trajectory(sim(small_synth, "sflv1", aggregation=above, syncs=1)) == trajectory(honest)
    below = AggregationConfig(clip_update_norm=min(norms) / 2)
    assert trajectory(sim(small_synth, "sflv1", aggregation=below, syncs=1)) != trajectory(honest)


def global_model(out: Path) -> dict[str, np.ndarray]:
    """The float tensors of the checkpointed global model of a run written to `out`."""
    tensors = load_file(str(checkpoint_file(out)))
    return {k: v.astype(np.float64) for k, v in tensors.items() if v.dtype.kind == "f"}


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))


@pytest.mark.parametrize("algo", ["sflv1", "fedavg"])
def test_a_robust_rule_contains_a_poisoned_update_the_mean_does_not(  # type: ignore[no-untyped-def]
    small_synth, algo: str, tmp_path: Path
) -> None:
    """One round, one device sending global - 100 x its update: how far does the global model
    land from where the clean round puts it? One average a round: the robust rules bound what
    one copy does to one average, so a round of N averages gives the attacker N tries (the
    MQTT test in tests/mqtt/test_poison.py runs the default)."""
    poison = one_of(PoisonRuntime, "client-01", scale=-100.0)
    robust = AggregationConfig(method="trimmed-mean", trim_ratio=0.34, clip_update_norm=2.0)
    runs = {
        "clean": (None, None),
        "mean": (poison, None),
        "robust": (poison, robust),
        "robust-clean": (None, robust),
    }
    models = {}
    for name, (factory, agg) in runs.items():
        sim(
            small_synth, algo, rounds=1, factory=factory, syncs=1, aggregation=agg,
            out_dir=tmp_path / name,
        )  # fmt: skip
        models[name] = global_model(tmp_path / name)
    clean = models["clean"]
    pulled = distance(models["mean"], clean)
    held = distance(models["robust"], clean)
    # The plain mean follows the attacker a third of its x100 way; the robust rule lands about
    # where the robust rule lands without an attacker.
    assert pulled > 10 * held, (pulled, held)
    assert held < 2 * distance(models["robust-clean"], clean) + 1.0, held
    assert all(np.isfinite(v).all() for v in models["robust"].values())
