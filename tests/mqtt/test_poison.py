"""One malicious edge agent over a real Mosquitto: robust aggregation holds, the mean does not.

The attacker is a separate `python -m tests.adversaries --poison-scale S` process: the real
edge agent (MQTT, wire checks and all) whose device runtime sends global + S x its honest
client-half update. Every other process is the product's. Over fp32 a federation equals
`aggregator simulate` number for number, so the short test holds the MQTT run to the
simulator's metrics for the same attack and rule and checks that the rule contains the attacker;
the slow one checks the accuracy target itself at the size of scripts/bench_robust.py: robust
under attack within 3 points of the clean plain mean, the plain mean under attack not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from .fed import (
    AGENT_CMD,
    IDENTITIES,
    THREADS,
    Mosquitto,
    Procs,
    agent_cmd,
    read_metrics,
    serve_cmd,
)

pytestmark = pytest.mark.mqtt

ATTACKER = 1
SCALE = -100.0
MARGIN = 0.03  # "within 3 points of a clean run"


@dataclass(frozen=True)
class Setting:
    """One federation: sflv1 on the synthetic set, one attacker, a robust rule (serve flags)."""

    clients: int
    rounds: int
    identities: int
    robust: tuple[str, ...]
    algo: str = "sflv1"


# Small enough for every test run: the model barely leaves chance in two rounds, so this checks
# that the robust rule contains the attacker (finite model, the simulator's numbers, a loss
# that keeps falling), not the accuracy target. Trimmed mean cutting one copy of three at each
# end per value, after clipping every update to norm 2 (honest updates here: 1.7 median).
SMALL = Setting(3, 2, IDENTITIES, ("--aggregation", "trimmed-mean", "--trim-ratio", "0.34",
                                   "--clip-update-norm", "2"))  # fmt: skip
# The accuracy target, at the size scripts/bench_robust.py measures: there the simulator gave
# clean mean 41.1 %, poisoned mean 0.0 %, poisoned trimmed mean (clip 2.5) 39.0 %.
FULL = Setting(5, 12, 40, ("--aggregation", "trimmed-mean", "--trim-ratio", "0.2",
                           "--clip-update-norm", "2.5"))  # fmt: skip


def aggregation(flags: tuple[str, ...]) -> Any:
    """The AggregationConfig that `flags` give `aggregator serve`."""
    from splitfed.config import AggregationConfig

    kw = dict(zip(flags[::2], flags[1::2], strict=True))
    return AggregationConfig(
        method=kw.get("--aggregation", "mean"),  # type: ignore[arg-type]
        trim_ratio=float(kw.get("--trim-ratio", 0.2)),
        clip_update_norm=float(kw["--clip-update-norm"]) if "--clip-update-norm" in kw else None,
    )


Simulated = Callable[[Setting, tuple[str, ...], "float | None"], dict[str, Any]]


@pytest.fixture(scope="module")
def simulated() -> Simulated:
    """The simulator's metrics of a setting for a rule and an attack (None: clean), cached."""
    cache: dict[tuple[Setting, tuple[str, ...], float | None], dict[str, Any]] = {}

    def get(setting: Setting, flags: tuple[str, ...], scale: float | None) -> dict[str, Any]:
        key = (setting, flags, scale)
        if key not in cache:
            import torch

            from splitfed.client import ClientRuntime
            from splitfed.data.synth import SynthConfig, generate_synth
            from splitfed.simulate import SimSpec, client_id, simulate
            from tests.adversaries import PoisonRuntime

            def make(cid: str, run: str, tr: Any, te: Any) -> ClientRuntime:
                if scale is not None and cid == client_id(ATTACKER):
                    return PoisonRuntime(cid, run, tr, te, scale=scale)
                return ClientRuntime(cid, run, tr, te)

            old = torch.get_num_threads()
            torch.set_num_threads(THREADS)  # as every process of the MQTT run
            try:
                ds = generate_synth(SynthConfig(identities=setting.identities))
                spec = SimSpec(setting.algo, setting.clients, setting.rounds, seed=0,
                               aggregation=aggregation(flags), runtime_factory=make)  # fmt: skip
                cache[key] = simulate(ds, spec)
            finally:
                torch.set_num_threads(old)
        return cache[key]

    return get


def federate(
    procs: Procs,
    out: Path,
    url: str,
    setting: Setting,
    flags: tuple[str, ...],
    round_timeout: float,
) -> dict[str, Any]:
    """serve + honest agents + one poisoning agent, each its own process; serve's metrics."""
    n, run_id = setting.clients, out.name
    extra = ["--round-timeout", str(round_timeout), *flags]
    procs.start("aggregator", serve_cmd(out, url, setting.algo, n, setting.rounds, run_id, *extra))
    for i in range(n):
        cmd = agent_cmd(url, i, n, run_id, "--synth-identities", str(setting.identities))
        if i == ATTACKER:  # the same agent, with the poisoning runtime inside
            cmd = [sys.executable, "-m", "tests.adversaries", "--poison-scale", str(SCALE),
                   *cmd[len(AGENT_CMD) :]]  # fmt: skip
        procs.start(f"client-{i:02d}", cmd)
    assert procs.wait("aggregator", 600) == 0, procs.logs()
    for i in range(n):  # --exit-when-done: they leave when the aggregator stops
        assert procs.wait(f"client-{i:02d}", 60) == 0, procs.logs()
    return read_metrics(out)


def model_is_finite(out: Path) -> bool:
    """Every float tensor of the checkpointed global model is finite."""
    from splitfed.checkpoint import checkpoint_file

    tensors = load_file(str(checkpoint_file(out)))
    return all(np.isfinite(t).all() for t in tensors.values() if t.dtype.kind == "f")


def trajectory(m: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(r["train_loss"], r["test_accuracy"], r["clients"]) for r in m["rounds"]]


def assert_contained(got: dict[str, Any], out: Path, setting: Setting) -> None:
    """The attacker took part in every round, unrejected, and the model stayed finite."""
    everyone = [f"client-{i:02d}" for i in range(setting.clients)]
    assert all(r["clients"] == everyone for r in got["rounds"]), trajectory(got)
    # Its messages pass every wire check: it is the aggregation rule that limits it.
    assert got["comm"]["rejected_messages"] == 0
    assert model_is_finite(out)


def test_robust_rule_contains_a_poisoning_agent_over_mqtt(
    mosquitto: Mosquitto, procs: Procs, simulated: Simulated, tmp_path: Path
) -> None:
    s = SMALL
    out = tmp_path / "poison-robust"
    got = federate(procs, out, mosquitto.url, s, s.robust, round_timeout=120)
    assert_contained(got, out, s)
    ref = simulated(s, s.robust, SCALE)
    assert trajectory(got) == trajectory(ref)  # the numbers the simulator gives, to the bit
    assert got["final"]["test_confusion"] == ref["final"]["test_confusion"]
    # The robust run keeps learning like the clean one, and its model scores every test
    # picture; the same attack through the plain mean makes the model non-finite at once, so
    # the devices' evaluation activations are dropped and nothing is scored.
    clean, ruined = simulated(s, (), None), simulated(s, (), SCALE)
    losses = [r["train_loss"] for r in got["rounds"]]
    assert losses[-1] < losses[0]
    assert losses[-1] <= 1.05 * clean["rounds"][-1]["train_loss"], (losses, trajectory(clean))
    scored = np.asarray(got["final"]["test_confusion"]).sum()
    assert scored == np.asarray(clean["final"]["test_confusion"]).sum() > 0
    assert np.asarray(ruined["final"]["test_confusion"]).sum() < scored, trajectory(ruined)
    assert ruined["final"]["test_accuracy"] < got["final"]["test_accuracy"]


@pytest.mark.soak  # about 5 minutes: scripts/benchmark.sh runs it; the short version above stays
def test_robust_rule_holds_accuracy_the_plain_mean_loses_over_mqtt(
    mosquitto: Mosquitto, procs: Procs, simulated: Simulated, tmp_path: Path
) -> None:
    """The issue's target at the benchmark's size: robust under attack within 3 points of the
    clean plain mean, the plain mean under attack not (both over MQTT)."""
    s = FULL
    clean = simulated(s, (), None)["final"]["test_accuracy"]
    out = tmp_path / "poison-robust"
    robust = federate(procs, out, mosquitto.url, s, s.robust, round_timeout=120)
    assert_contained(robust, out, s)
    assert robust["final"]["test_accuracy"] >= clean - MARGIN, (robust["final"], clean)
    procs.stop_all()
    procs.procs.clear()
    # The plain mean is ruined by the first aggregate: the model turns non-finite, the devices'
    # activations are dropped and every later step waits out the round timeout, so this run
    # is two rounds long (the timeout still leaves an honest round time to finish).
    short = Setting(s.clients, 2, s.identities, ())
    mean = federate(procs, tmp_path / "poison-mean", mosquitto.url, short, (), round_timeout=30)
    assert mean["final"]["test_accuracy"] < clean - MARGIN, (mean["final"], clean)
    assert mean["final"]["test_accuracy"] <= 1 / 7 + MARGIN  # no better than chance
