"""A real federation takes over 10,000 hostile messages in 24 classes and finishes its run.

`aggregator serve` and two `edge-agent`s run as processes over Mosquitto; hostile publishers
(`tests/mqtt/hostile/`, also processes) send every class while the aggregator waits for the
agents, then, once the round runs, replays of the agents' real traffic and junk on the agents'
own topics. Nothing crashes, the round completes with both agents, and metrics.json counts each
class under the reason it was refused for.

A standard run refuses the U-shape's messages by their type alone, so a second, smaller run
with `--shape u` takes the classes aimed at their bodies (FEATURE_GRADS of the wrong shape,
dtype, round or step, with NaN, oversized, answering nothing; FEATURES sent up), and its agents
forged FEATURES and FEATURE_GRADS under the aggregator's id.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from splitfed.client import CLIENT_PREFIX
from splitfed.model import ModelConfig, build_split_model, feature_dim, smashed_shape
from splitfed.training import state_to_numpy
from splitfed.wire import weights_spec

from .fed import Mosquitto, Procs, agent_cmd, parts_trained, read_metrics, serve_cmd
from .hostile import (
    AGENT_REASONS,
    AGENT_U_REASONS,
    AGENT_U_RUN_REASONS,
    ALL_CLASSES,
    CLASSES,
    U_CLASSES,
    Target,
    write_pairs,
    write_spec,
)

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

HOSTILE_CMD = [sys.executable, "-m", "tests.mqtt.hostile"]


@dataclass(frozen=True)
class Scenario:
    run: str
    classes: tuple[str, ...]
    per_class: int
    publishers: int
    min_hostile: int  # phase 1 sends at least this many
    serve_extra: tuple[str, ...]
    agent_reasons: frozenset[str]


# 450 x 24 classes = 10,800 hostile messages before the agents even start. No defence, so the
# shapes are the default model's (the default defence deepens the cut).
STANDARD = Scenario(
    "fuzz", tuple(CLASSES), 450, 4, 10_000, ("--defence", "none"), AGENT_REASONS | AGENT_U_REASONS
)
USHAPED = Scenario("fuzz-u", tuple(U_CLASSES), 100, 2, 800, ("--shape", "u", "--defence", "none"),
                   AGENT_REASONS | AGENT_U_RUN_REASONS)  # fmt: skip


def target(run: str) -> Target:
    model = ModelConfig()
    client, _ = build_split_model(model, 0)
    spec = weights_spec(state_to_numpy(client), CLIENT_PREFIX)
    weights = {k: (next(iter(dtypes)), shape) for k, (dtypes, shape) in spec.items()}
    return Target(run, "splitfed", smashed_shape(model), tuple(model.input_shape), weights,
                  feature_dim(model))  # fmt: skip


class Watch:
    """Watches the aggregator's status and keeps the agents' first `up` messages.

    `training` is set once the agents have sent `enough` messages (their JOINs and the first
    smashed batches): the round is running, and there is real traffic to replay.
    """

    def __init__(self, port: int, run: str, enough: int = 6) -> None:
        self.online = threading.Event()
        self.training = threading.Event()
        self.enough = enough
        self.honest_up: list[tuple[str, bytes]] = []
        self.agents_started = False
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watch",
                                  protocol=mqtt.MQTTv311)  # fmt: skip
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(f"splitfed/{run}/aggregator/status", 1), (f"splitfed/{run}/+/up", 1)]
        )  # fmt: skip
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        cid, kind = msg.topic.split("/")[2:4]
        if kind == "status" and msg.payload.startswith(b"online"):
            self.online.set()
        elif kind == "up" and cid.startswith("client-") and self.agents_started:
            with self.lock:  # (before the agents start, hostile spoofs use these topics too)
                if len(self.honest_up) < self.enough:
                    self.honest_up.append((msg.topic, bytes(msg.payload)))
                if len(self.honest_up) >= self.enough:
                    self.training.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(event: threading.Event, procs: Procs, names: list[str], timeout: float) -> None:
    for _ in range(int(timeout * 10)):
        if event.wait(0.1):
            return
        procs.check_alive(*names)
    pytest.fail(f"timed out after {timeout:.0f} s\n{procs.logs()}")


def _wait_for_log(procs: Procs, needles: list[str], timeout: float) -> None:
    """Until the aggregator's log has every line in `needles` (it is still running)."""
    missing = needles
    for _ in range(int(timeout * 5)):
        log = procs.log("aggregator")
        missing = [n for n in needles if n not in log]
        if not missing:
            return
        procs.check_alive("aggregator")
        time.sleep(0.2)
    pytest.fail(f"the aggregator never logged {missing[:5]}\n{procs.logs()}")


@pytest.mark.parametrize("sc", [STANDARD, USHAPED], ids=["standard", "u-shaped"])
def test_federation_survives_hostile_processes(
    sc: Scenario, mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    spec, out = tmp_path / "target.json", tmp_path / "out"
    write_spec(spec, target(sc.run))
    watch = Watch(mosquitto.port, sc.run)
    names = list(sc.classes)
    try:
        procs.start("aggregator", serve_cmd(out, mosquitto.url, "sflv2", 2, 1, sc.run,
                                            "--round-timeout", "120", *sc.serve_extra))  # fmt: skip
        _wait(watch.online, procs, ["aggregator"], 90)
        # Phase 1: every class, from separate processes, while the aggregator waits for agents.
        # One publisher at a time, each until the aggregator has been through its classes (its
        # closing JOINs are in the log), so that the hostile traffic never overfills the inbox.
        reports = [tmp_path / f"hostile-{i}.json" for i in range(sc.publishers + 1)]
        for i in range(sc.publishers):
            classes = ",".join(names[i :: sc.publishers])
            procs.start(f"hostile-{i}", [*HOSTILE_CMD, "--broker", mosquitto.url, "--spec",
                        str(spec), "--classes", classes, "--count", str(sc.per_class), "--seed",
                        str(i), "--report", str(reports[i])])  # fmt: skip
            assert procs.wait(f"hostile-{i}", 120) == 0, procs.logs()
            markers = json.loads(reports[i].read_text())["markers"]
            _wait_for_log(procs, [f"client {c} {word}" for c, word in markers.items()], 180)
        watch.agents_started = True
        for i in range(2):
            stats = tmp_path / f"client-{i:02d}.json"
            cmd = agent_cmd(mosquitto.url, i, 2, sc.run, "--stats-file", str(stats))
            procs.start(f"client-{i:02d}", cmd)
        # Phase 2, while the round runs: replays of the agents' traffic, junk for the agents.
        _wait(watch.training, procs, ["aggregator", "client-00", "client-01"], 120)
        with watch.lock:
            honest = list(watch.honest_up)
        replays = tmp_path / "honest.bin"
        write_pairs(replays, honest)
        procs.start("hostile-live", [*HOSTILE_CMD, "--broker", mosquitto.url, "--spec", str(spec),
                    "--agents", "client-00,client-01", "--count", "40", "--replay", str(replays),
                    "--seed", "99", "--report", str(reports[-1])])  # fmt: skip
        assert procs.wait("hostile-live", 60) == 0, procs.logs()
        assert procs.wait("aggregator", 240) == 0, procs.logs()
        for i in range(2):
            assert procs.wait(f"client-{i:02d}", 60) == 0, procs.logs()
    finally:
        watch.close()

    sent: dict[str, int] = {}
    for r in reports:
        sent.update(json.loads(r.read_text())["sent"])
    phase1 = sum(sent[c] for c in names)
    assert len(names) >= 8 and phase1 >= sc.min_hostile, sent
    log = procs.log("aggregator")
    assert "Traceback" not in log, log[-3000:]

    m = read_metrics(out)
    row = m["rounds"][0]
    assert row["clients"] == ["client-00", "client-01"] and row["dropped"] == [], row
    rejected: dict[str, int] = m["comm"]["rejected_by_reason"]
    dropped: dict[str, int] = m["comm"]["transport_dropped_by_reason"]
    # Every hostile message of phase 1 was refused (JOINs of the hostile senders were not
    # hostile); each class under its own reason(s).
    assert sum(rejected.values()) + sum(dropped.values()) >= phase1, (rejected, dropped)
    for name in names:
        cls = ALL_CLASSES[name]
        counts = rejected if cls.counted == "rejected" else dropped
        if cls.reasons:
            got = sum(counts.get(r, 0) for r in cls.reasons)
            assert got >= sent[name], f"{name}: {got} under {sorted(cls.reasons)} < {sent[name]}"
    # replays of the agents' own JOINs and batches (phase 2) were refused too
    assert rejected["replay"] >= sent.get("replay", 0) + 2, (rejected["replay"], sent)

    for i in range(2):  # the agents refused their junk by reason, and trained all the same
        stats = json.loads((tmp_path / f"client-{i:02d}.json").read_text())
        reasons = stats["rejected_by_reason"]
        assert sc.agent_reasons <= set(reasons), reasons
        # one round: one update per part it had batches in
        parts = parts_trained(m)[i]
        assert stats["counters"]["sent_client_update"] == parts, stats["counters"]
