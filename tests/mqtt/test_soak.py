"""A short chaos soak (scripts/soak.py's own functions): the run survives its faults.

3 `edge-agent`s and `aggregator serve` over Mosquitto for 2 rounds of SFLV1, with one agent
`kill -9`ed and started again, the aggregator `kill -9`ed after round 1 and the same command
resumed, and hostile publishers (every class) for the whole run, while the checkpoint is read
all along. The full soak (8 agents, a broker restart, several agent kills) is
`scripts/soak.py`, run by scripts/benchmark.sh.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .fed import REPO

pytestmark = pytest.mark.mqtt


def _soak() -> ModuleType:
    name = "splitfed_soak"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "soak.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # (dataclasses look their module up)
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_schedule_is_seeded_and_kills_the_aggregator_only_after_a_checkpoint() -> None:
    import numpy as np

    soak = _soak()
    cfg = soak.SoakConfig(agents=8, rounds=4)
    a = soak.draw_faults(cfg, np.random.default_rng(3))
    assert a == soak.draw_faults(cfg, np.random.default_rng(3))
    assert a != soak.draw_faults(cfg, np.random.default_rng(4))
    kinds = [f.kind for f in a]
    assert kinds.count("agent_kill") == 4 and kinds.count("broker_restart") == 1
    (agg,) = [f for f in a if f.kind == "aggregator_kill"]
    assert 1 <= agg.after_rounds <= cfg.rounds - 1  # a checkpoint exists, a round remains
    assert {f.target for f in a if f.kind == "agent_kill"} <= {f"client-{i:02d}" for i in range(8)}


def test_short_soak_survives_kills_resume_and_hostile_publishers(tmp_path: Path) -> None:
    soak = _soak()
    cfg = soak.SoakConfig(
        agents=3,
        rounds=2,
        seconds=240,
        seed=1,
        agent_kills=1,
        broker_restarts=0,
        aggregator_kills=1,
        hostile_count=5,
        hostile_group=len(soak.CLASSES),  # every class in every publisher process
        hostile_interval=1.0,
        local_epochs=4,
    )
    r = soak.run_federation(cfg, tmp_path, faults=True)
    logs = Path(r["logs"])
    where = f"{r['problems']}; events {r['events']}; logs in {logs}"

    assert r["status"] == "finished" and r["ok"], where
    assert r["rounds"] == [1, 2], where
    # Every agent trained in the resumed round: they took its rounds from the checkpoint's.
    assert r["clients_by_round"][-1] == 3 and r["dropped_by_round"][-1] == [], where
    assert r["faults_survived"] == {"agent_kill": 1, "broker_restart": 0, "aggregator_kill": 1}
    # Only the processes killed on purpose ended badly; the resumed aggregator carried on.
    assert r["crashed"] == [], where
    assert "aggregator" in r["killed_on_purpose"], where
    assert "resumed sflv1 from round 1" in (logs / "aggregator-1.log").read_text(), where
    # The checkpoint was read again and again while it was rewritten, and never failed.
    assert r["checkpoint"]["reads"] > 0 and r["checkpoint"]["failures"] == 0, r["checkpoint"]
    # Hostile traffic reached the final aggregator and each class was counted as refused.
    checks = soak.hostile_check(r)
    assert len(checks) >= 15, (checks, r["hostile_sent_by_class"])
    missing = {k: v for k, v in checks.items() if v["counted"] <= 0}
    assert not missing, missing
    assert r["broker"]["messages_received"] > sum(r["hostile_sent_by_class"].values()) > 0
