"""`aggregator serve --workers 2`: agents sharded over two torch.distributed workers.

Four agents over a real Mosquitto; each worker trains its own agents (SFLV1: their server
copies), and the merged round must give exactly the numbers of `aggregator simulate` (and so
of one worker): the same seeded batches, the same averages in the same client order.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from splitfed.distributed import owner
from splitfed.mqtt import LinkSettings, MqttTransport
from splitfed.transport import Incoming
from tests.procfs import HAS_PROC, children, left_running, spawned

from .fed import Mosquitto, Procs, agent_cmd, read_metrics, retained_topics, serve_cmd
from .test_e2e import FINAL_FIELDS, ROUND_FIELDS

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

CLIENTS = 4
IDS = [f"client-{i:02d}" for i in range(CLIENTS)]


def start(procs: Procs, out: Path, url: str, algo: str, run_id: str, workers: int) -> str:
    """serve --workers N + four agents as processes, named by `run_id`; returns that name."""
    extra = ["--round-timeout", "120", "--workers", str(workers)]
    procs.start(run_id, serve_cmd(out, url, algo, CLIENTS, 2, run_id, *extra))
    for i in range(CLIENTS):
        procs.start(f"{run_id}-client-{i:02d}", agent_cmd(url, i, CLIENTS, run_id))
    return run_id


def finish(procs: Procs, name: str, out: Path) -> dict[str, Any]:
    """Wait for one federation of `start`; rank 0's metrics.json."""
    assert procs.wait(name, 300) == 0, procs.logs()
    for i in range(CLIENTS):
        assert procs.wait(f"{name}-client-{i:02d}", 60) == 0, procs.logs()
    return read_metrics(out)


def assert_same(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    assert len(got["rounds"]) == len(ref["rounds"])
    for r, (a, b) in enumerate(zip(got["rounds"], ref["rounds"], strict=True)):
        for f in ROUND_FIELDS:
            assert a[f] == b[f], f"round {r + 1} {f}: 2 workers {a[f]!r} != {what} {b[f]!r}"
    for f in FINAL_FIELDS:
        assert got["final"][f] == ref["final"][f], f"final {f}: {got['final'][f]} != {what}"


def test_owner_is_stable_and_shards_the_test_agents() -> None:
    homes = [owner(c, 2) for c in IDS]
    assert homes == [owner(c, 2) for c in IDS]  # a restarted worker computes the same
    assert set(homes) == {0, 1}, homes  # both workers have agents in the test below
    assert all(owner(c, 1) == 0 for c in IDS)


@pytest.mark.parametrize("algo", ["sflv1", "fedavg"])
def test_two_workers_equal_one_and_simulate(
    algo: str, mosquitto: Mosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    run_id = f"workers-{algo}"
    out = tmp_path / "out"
    # Equal to simulate is equal to one worker too: test_e2e holds serve with one worker to
    # simulate for every algorithm, and simulate does not know about workers.
    two = start(procs, out, mosquitto.url, algo, run_id, workers=2)
    metrics = finish(procs, two, out)
    log = procs.log(two)
    for rank in (0, 1):  # each worker hosted exactly the agents the hash gives it
        mine = ", ".join(c for c in IDS if owner(c, 2) == rank)
        assert f"worker {rank} of 2 hosts {mine}" in log, log[-3000:]
    assert metrics["workers"] == 2
    assert metrics["comm"]["rejected_messages"] == 0, metrics["comm"]
    assert metrics["comm"]["transport_dropped"] == 0, metrics["comm"]
    assert_same(metrics, reference(algo, clients=CLIENTS), "simulate")
    retained = retained_topics(mosquitto.url, want=[f"splitfed/{run_id}/{c}/assign" for c in IDS])
    for c in IDS:  # every agent's home, retained for a restarted worker or agent
        assert retained[f"splitfed/{run_id}/{c}/assign"] == f"{owner(c, 2)}/2".encode()
    assert (out / "checkpoint").is_dir()


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_worker_transport_takes_only_its_agents_and_pins_their_topics(
    mosquitto: Mosquitto,
) -> None:
    """Rank 1 of 2: silent until announced, sees only its agents, then only their `up` topics."""
    mine = {"a1", "late"}
    t = MqttTransport(
        LinkSettings.from_url(mosquitto.url), "splitfed", "shard", presence_grace=0,
        owns=lambda c: c in mine, worker=(1, 2),
    )  # fmt: skip
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="agents", protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    got: list[Incoming] = []

    def drain() -> None:
        while (ev := t.recv(0.2)) is not None:
            got.append(ev)

    try:
        assert t.start(wait=10)
        assert "splitfed/shard/aggregator-w1/status" not in retained_topics(mosquitto.url, 0.5)
        for cid in ("a1", "b1"):
            pub.publish(f"splitfed/shard/{cid}/status", b"online", qos=1, retain=True)
            pub.publish(f"splitfed/shard/{cid}/up", b"join " + cid.encode(), qos=1)
        assert _until(lambda: (drain(), any(e.data for e in got))[1])
        drain()
        assert {e.client_id for e in got} == {"a1"}  # b1 is the other worker's
        t.pin_clients(["a1"])
        assert "splitfed/shard/+/up" not in t.link.subscriptions
        assert "splitfed/shard/a1/up" in t.link.subscriptions
        pub.publish("splitfed/shard/late/status", b"online", qos=1, retain=True)
        assert _until(lambda: "splitfed/shard/late/up" in t.link.subscriptions)
        t.announce()
        status = "splitfed/shard/aggregator-w1/status"
        assigns = ["splitfed/shard/a1/assign", "splitfed/shard/late/assign"]
        retained = retained_topics(mosquitto.url, 1.0, want=[status, *assigns])
        assert retained["splitfed/shard/a1/assign"] == b"1/2"
        assert retained["splitfed/shard/late/assign"] == b"1/2"
        assert "splitfed/shard/b1/assign" not in retained
        assert retained[status].startswith(b"online ")
        assert "splitfed/shard/aggregator/status" not in retained  # rank 0's, not rank 1's
        got.clear()
        pub.publish("splitfed/shard/a1/up", b"step", qos=1)
        assert _until(lambda: (drain(), any(e.data == b"step" for e in got))[1])
        assert [e.data for e in got if e.data] == [b"step"]  # once: the wildcard is gone
    finally:
        pub.disconnect()
        pub.loop_stop()
        t.close()


def test_single_server_half_algorithms_refuse_workers(tmp_path: Path) -> None:
    cmd = serve_cmd(tmp_path, "mqtt://127.0.0.1:1", "sflv2", CLIENTS, 1, "w", "--workers", "2")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "sflv2 trains one server half" in done.stderr + done.stdout


def test_a_late_agent_whose_join_was_lost_is_homed_and_trains_from_the_next_round(
    mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    """A JOIN sent before the home worker subscribed reaches nobody; the worker finds the agent
    (online, homed, never joined), rank 0 announces a new instance and the agent trains."""
    from edge_agent.agent import Agent
    from splitfed.client import ClientRuntime
    from splitfed.data.partition import client_shards
    from splitfed.data.synth import SynthConfig, generate_synth

    from .fed import IDENTITIES, Tap

    run_id, late = "late", "client-02"
    out = tmp_path / "out"
    extra = ["--round-timeout", "120", "--workers", "2"]
    procs.start(run_id, serve_cmd(out, mosquitto.url, "sflv1", 2, 4, run_id, *extra))
    for i in range(2):
        procs.start(f"agent-{i}", agent_cmd(mosquitto.url, i, 3, run_id))
    tap = Tap(mosquitto.url)
    agent = None
    try:
        pinned = lambda t, _p: t == f"splitfed/{run_id}/client-00/assign"  # noqa: E731
        assert tap.wait_for(pinned, 180, lambda: procs.check_alive(run_id)), procs.logs()
        _, _, shards = client_shards(generate_synth(SynthConfig(identities=IDENTITIES)), 3)
        agent = Agent(
            ClientRuntime(late, run_id, *shards[2]), LinkSettings.from_url(mosquitto.url),
            "splitfed", run_id, exit_when_done=True,
        )  # fmt: skip
        agent.link.online_payload = None  # no `online` yet: its JOIN goes out to nobody
        agent.start()
        threading.Thread(target=agent.run, daemon=True).start()
        assert _until(agent.joined.is_set, 60)
        procs.check_alive(run_id)  # still training: the next rounds can take the agent
        agent.link.announce(b"online")  # now its home worker subscribes
        assert procs.wait(run_id, 300) == 0, procs.logs()
        assert agent.counters["joins"] >= 2  # asked to join again, and did
    finally:
        tap.close()
        if agent is not None:
            agent.stop.set()
            agent.close()
    metrics = read_metrics(out)
    log = procs.log(run_id)
    assert f"{late} online but never joined: asking every agent to join again" in log, log[-3000:]
    assert late in metrics["rounds"][-1]["clients"], metrics["rounds"]
    assert late not in metrics["rounds"][0]["clients"]
    for r in metrics["rounds"]:  # the re-announce dropped nobody from a round
        assert r["dropped"] == [], metrics["rounds"]
    retained = retained_topics(mosquitto.url, want=[f"splitfed/{run_id}/{late}/assign"])
    assert retained[f"splitfed/{run_id}/{late}/assign"] == f"{owner(late, 2)}/2".encode()


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc (Linux)")
def test_killing_rank_0_ends_the_other_workers(
    mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    """SIGKILL of `serve --workers 2` leaves rank 1 nobody to train with: it ends too, at once,
    not when its collectives time out."""
    out = tmp_path / "out"
    cmd = serve_cmd(out, mosquitto.url, "sflv1", CLIENTS, 2, "killed", "--workers", "2")
    serve = procs.start("killed", cmd)
    workers = spawned(serve.pid, 1, 120, lambda: procs.check_alive("killed"))
    assert workers, procs.logs()
    helpers = children(serve.pid)
    procs.kill("killed")
    left = left_running(helpers, 30)
    assert not left, left
