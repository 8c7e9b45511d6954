"""The federation through more than one broker node, and with MQTT 5 shared subscriptions.

Two Mosquittos bridged (scripts/start_mosquitto_bridge.sh, every `splitfed/#` topic both ways)
stand in for a broker cluster: the agents on broker A, the aggregator on broker B. And
`serve --shared-subscription GROUP` puts the aggregator's subscriptions under
`$share/GROUP/...`. Either way the run must give exactly the numbers of `aggregator simulate`
(which the single-broker default gives too, tests/mqtt/test_e2e.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitfed.errors import UserError
from splitfed.mqtt import LinkSettings, MqttTransport

from .fed import (
    REPO,
    Mosquitto,
    Procs,
    agent_cmd,
    free_port,
    read_metrics,
    retained_topics,
    serve_cmd,
)
from .test_e2e import assert_equal_metrics, federate

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


class Bridged:
    """Broker A and broker B (bridged to A) from scripts/start_mosquitto_bridge.sh."""

    def __init__(self, directory: Path) -> None:
        self.port_a, self.port_b = free_port(), free_port()
        self.dir = directory
        done = subprocess.run(
            [str(REPO / "scripts" / "start_mosquitto_bridge.sh"), str(self.port_a),
             str(self.port_b), str(directory)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        self.pids = [int(p) for p in done.stdout.split()]

    def url(self, which: str) -> str:
        return f"mqtt://127.0.0.1:{self.port_a if which == 'a' else self.port_b}"

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[Bridged]:
    b = Bridged(tmp_path / "bridge")
    yield b
    b.stop()


def test_agents_on_one_broker_and_the_aggregator_on_another_equal_simulate(
    bridged: Bridged, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    """Agents on A, aggregator on B: every message crosses the bridge, retained ones too."""
    run_id = "bridged"
    out = tmp_path / "out"
    extra = ["--round-timeout", "120"]
    procs.start("aggregator", serve_cmd(out, bridged.url("b"), "sflv1", 3, 2, run_id, *extra))
    for i in range(3):
        procs.start(f"client-{i:02d}", agent_cmd(bridged.url("a"), i, 3, run_id))
    assert procs.wait("aggregator", 300) == 0, procs.logs()
    for i in range(3):
        assert procs.wait(f"client-{i:02d}", 60) == 0, procs.logs()
    metrics = read_metrics(out)
    assert_equal_metrics(metrics, reference("sflv1"))
    assert metrics["comm"]["rejected_messages"] == 0, metrics["comm"]
    assert metrics["comm"]["transport_dropped"] == 0, metrics["comm"]
    # The aggregator's retained state reached the agents' broker as retained.
    on_a = retained_topics(bridged.url("a"), want=[f"splitfed/{run_id}/aggregator/global"])
    assert on_a[f"splitfed/{run_id}/aggregator/status"] == b"stopped"
    assert f"splitfed/{run_id}/aggregator/global" in on_a


@pytest.mark.parametrize("workers", [1, 2])
def test_shared_subscriptions_give_the_same_run(
    workers: int, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.conf.write_text(broker.conf.read_text() + "log_type subscribe\n")
    broker.start()
    run_id = f"shared-w{workers}"
    try:
        metrics = federate(
            procs, tmp_path / "out", broker.url, "sflv1", run_id,
            serve_args=("--shared-subscription", "aggs", "--workers", str(workers)),
        )  # fmt: skip
    finally:
        broker.stop()
    assert_equal_metrics(metrics, reference("sflv1"))
    assert metrics["comm"]["rejected_messages"] == 0, metrics["comm"]
    assert metrics["comm"]["transport_dropped"] == 0, metrics["comm"]
    log = (broker.dir / "mosquitto.log").read_text()
    # The broker saw shared subscriptions (rank R > 0 in a group of its own), no plain wildcard.
    assert f"$share/aggs/splitfed/{run_id}/+/up" in log, log[-2000:]
    assert f"$share/aggs/splitfed/{run_id}/+/status" in log
    assert f" splitfed/{run_id}/+/up" not in log
    if workers == 2:
        assert f"$share/aggs-w1/splitfed/{run_id}/+/up" in log


def test_shared_group_names_are_checked() -> None:
    with pytest.raises(UserError, match="shared subscription group"):
        MqttTransport(LinkSettings(), "splitfed", "r", shared_group="a/#")
