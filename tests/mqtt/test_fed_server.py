"""A separate fed server, as in the SplitFed paper: the main server never sees a client half.

`aggregator serve --fed-server` (the main server) trains the server half; `aggregator
fed-server` averages the client halves; two `edge-agent` processes train. Over Mosquitto with
mutual TLS, passwords and the shipped ACL, the metrics equal `aggregator simulate`'s (which
`tests/mqtt/test_e2e.py` holds equal to plain `serve`) number for number, and a client logged
in as the main server's user, subscribed to `#`, receives no client-weight message while the
fed server's user does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from splitfed.config import TrainConfig
from splitfed.mqtt import parse_topic
from splitfed.wire import decode

from .conftest import TlsMosquitto
from .fed import AGENT_CMD, IDENTITIES, REPO, THREADS, Mosquitto, Procs, read_metrics, serve_cmd
from .test_e2e import assert_equal_metrics
from .test_tls import Peer

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

PREFIX = "splitfed"
FED_CMD = [sys.executable, "-c", "from aggregator.cli import main; main()", "fed-server"]
CLIENTS = ["client-00", "client-01"]  # the ids simulate gives its clients
USERS = ("aggregator", "fed-server", *CLIENTS)


def fed_cmd(url: str, run_id: str, out: Path, *extra: str) -> list[str]:
    return [*FED_CMD, "--broker", url, "--run-id", run_id, "--out", str(out),
            "--checkpoint-dir", str(out / "checkpoint"), "--threads", str(THREADS),
            "--exit-when-done", *extra]  # fmt: skip


def agent(url: str, cid: str, shard: str, run_id: str, *extra: str) -> list[str]:
    return [*AGENT_CMD, "--broker", url, "--client-id", cid, "--dataset", "synth",
            "--synth-identities", str(IDENTITIES), "--shard", shard, "--seed", "0",
            "--threads", str(THREADS), "--run-id", run_id, "--exit-when-done", *extra]  # fmt: skip


def run_federation(
    procs: Procs, url: str, algo: str, run_id: str, out: Path, flags: dict[str, list[str]]
) -> dict[str, Any]:
    """Main server, fed server and two agents (2 rounds); returns the main's metrics."""
    none: list[str] = []
    procs.start("aggregator", serve_cmd(out / "main", url, algo, 2, 2, run_id, "--fed-server",
                                        "--round-timeout", "120",
                                        *flags.get("aggregator", none)))  # fmt: skip
    procs.start("fed-server", fed_cmd(url, run_id, out / "fed", *flags.get("fed-server", none)))
    for i, cid in enumerate(CLIENTS):
        procs.start(cid, agent(url, cid, f"{i}/2", run_id, *flags.get(cid, none)))
    assert procs.wait("aggregator", 300) == 0, procs.logs()
    for name in ("fed-server", *CLIENTS):
        assert procs.wait(name, 60) == 0, procs.logs()
    return read_metrics(out / "main")


def check_halves(out: Path, rounds: int = 2) -> None:
    """The main server checkpointed the server half only, the fed server the client half."""
    main = load_file(str(out / "main" / "checkpoint" / "model.safetensors"))
    fed = load_file(str(out / "fed" / "checkpoint" / "model.safetensors"))
    assert main and all(k.startswith("server.") for k in main), sorted(main)[:5]
    assert fed and all(k.startswith("client.") for k in fed), sorted(fed)[:5]
    report = read_metrics_file(out / "fed" / "fed-server.json")
    # One average per part in which the devices trained: every part of a round at most, and
    # fewer when the devices have fewer batches than parts (the empty parts average nothing).
    averages = len(report["rounds"])
    assert rounds <= averages <= rounds * TrainConfig().syncs_per_round
    assert report["weights_version"] == averages
    assert [r["clients"] for r in report["rounds"]] == [CLIENTS] * averages
    wire_rounds = [r["round"] for r in report["rounds"]]
    assert wire_rounds == sorted(set(wire_rounds))
    assert report["rejected_messages"] == 0, report["rejected_by_reason"]


def read_metrics_file(path: Path) -> dict[str, Any]:
    import json

    return dict(json.loads(path.read_text()))


@pytest.fixture
def fed_mosquitto(tmp_path: Path) -> Any:
    broker = TlsMosquitto(tmp_path / "mosquitto-fed", users=USERS)
    broker.start()
    yield broker
    broker.stop()


def test_fed_server_over_tls_acl_equals_simulate(
    fed_mosquitto: TlsMosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    b = fed_mosquitto
    run_id = "fed"
    ca, certs = b.certs / "ca.crt", b.certs

    def login(user: str) -> Peer:
        peer = Peer(b.port, ca, certs / f"{user}.crt", certs / f"{user}.key", user,
                    b.password_files[user], name=f"{user}-tap")  # fmt: skip
        assert peer.connected(), f"{user} could not log in"
        return peer

    # The main server's user, as a curious main server would: everything, the halves too.
    main_tap = login("aggregator")
    main_tap.c.subscribe([("#", 1), (f"{PREFIX}/{run_id}/+/weights", 1)])
    fed_tap = login("fed-server")
    fed_tap.c.subscribe([(f"{PREFIX}/{run_id}/+/weights", 1),
                         (f"{PREFIX}/{run_id}/fed-server/global", 1)])  # fmt: skip
    time.sleep(0.5)

    flags = {u: b.tls_flags(u) for u in USERS}
    metrics = run_federation(procs, b.url, "sflv1", run_id, tmp_path, flags)
    time.sleep(0.5)
    seen_main, seen_fed = main_tap.close(), fed_tap.close()

    assert_equal_metrics(metrics, reference("sflv1", clients=2, rounds=2))
    assert [sorted(r["clients"]) for r in metrics["rounds"]] == [CLIENTS] * 2
    assert set(metrics["held"]) == {"main_server", "fed_server", "devices"}
    assert metrics["comm"]["rejected_messages"] == 0, metrics["comm"]["rejected_by_reason"]
    check_halves(tmp_path)

    # The fed server's user got both devices' halves of every part they trained in (a device
    # sits out a part with none of its batches), one pair per average it made ...
    halves = [(t, p) for t, p in seen_fed if t.endswith("/weights")]
    averages = len(read_metrics_file(tmp_path / "fed" / "fed-server.json")["rounds"])
    every = CLIENTS * averages
    assert sorted(parse_topic(PREFIX, run_id, t)[0] for t, _ in halves) == sorted(every)
    assert all(decode(p).tensors for _, p in halves)
    assert any(t.endswith("/fed-server/global") for t, _ in seen_fed)  # and their average
    # The main server's user saw the rest of the run ...
    kinds = {parse_topic(PREFIX, run_id, t) for t, _ in seen_main}
    want = {(CLIENTS[0], "up"), (CLIENTS[1], "down"), ("fed-server", "status")}
    assert want <= kinds, kinds
    # ... but no client half: neither the devices' nor their average (the ACL denies both).
    assert not [t for t, _ in seen_main if t.endswith(("/weights", "/fed-server/global"))]
    # What reached it of the devices' updates and of its own round and evaluation messages
    # carries no weights at all.
    for t, p in seen_main:
        cid, kind = parse_topic(PREFIX, run_id, t) or ("", "")
        if kind in ("up", "down"):
            msg = decode(p)
            if msg.type.value in ("client_update", "round_start", "eval_request"):
                assert not msg.tensors, (t, msg.type.value, sorted(msg.tensors)[:3])


def test_sflv2_with_fed_server_equals_simulate(
    mosquitto: Mosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    metrics = run_federation(procs, mosquitto.url, "sflv2", "fed2", tmp_path, {})
    assert_equal_metrics(metrics, reference("sflv2", clients=2, rounds=2))
    check_halves(tmp_path)


@pytest.mark.parametrize("algo", ["sl", "fedavg", "pyvertical", "fedsl"])
def test_fed_server_needs_client_halves_to_average(algo: str, tmp_path: Path) -> None:
    cmd = serve_cmd(tmp_path, "mqtt://127.0.0.1:9", algo, 2, 1, "x", "--fed-server")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--fed-server" in lines[0] and algo in lines[0], r.stderr
