"""The small parts: topics, presence, broker URLs, passwords, TLS files, configs, an honest link,
the embedded broker's rules and enrolment."""

from __future__ import annotations

import io
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from aggregator.serve import serve
from aggregator.serve_config import load_allow_list
from aggregator.serve_io import NOT_ENROLLED, ServeIO
from edge_agent.agent import Agent
from edge_agent.cli import main as agent_main
from edge_agent.config import load_config
from splitfed.broker import EmbeddedBroker, add_user, is_loopback, read_users
from splitfed.broker import main as broker_main
from splitfed.client import CLIENT_PREFIX, ClientRuntime
from splitfed.config import TrainConfig
from splitfed.data.partition import client_shards
from splitfed.errors import UserError
from splitfed.model import ModelConfig, build_split_model
from splitfed.mqtt import (
    DOWN,
    STATUS,
    LinkSettings,
    MqttLink,
    parse_presence,
    parse_topic,
    read_password,
    topic,
)
from splitfed.server import AGGREGATOR_ID
from splitfed.training import prefixed, state_to_numpy
from splitfed.wire import MAX_MESSAGE_BYTES, MsgType, Sequencer, encode

from .conftest import TlsMosquitto
from .fed import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]


def test_topics_are_checked_and_parsed() -> None:
    assert topic("splitfed", "run1", "pi-01", "up") == "splitfed/run1/pi-01/up"
    assert parse_topic("splitfed", "run1", "splitfed/run1/pi-01/status") == ("pi-01", "status")
    for bad in ("splitfed/run2/pi-01/up", "splitfed/run1/pi 01/up", "splitfed/run1/pi-01/x",
                "splitfed/run1/a/b/up", "other/run1/pi-01/up"):  # fmt: skip
        assert parse_topic("splitfed", "run1", bad) is None, bad
    with pytest.raises(ValueError):
        topic("splitfed", "run1", "a/b", "up")
    with pytest.raises(ValueError):
        topic("splitfed", "run#", "a", "up")


def test_presence_payloads() -> None:
    assert parse_presence(b"online") == ("online", "")
    assert parse_presence(b"online 3f2a") == ("online", "3f2a")
    assert parse_presence(b"offline") == ("offline", "")
    assert parse_presence(b"stopped") == ("stopped", "")
    for bad in (b"maybe", b"online a b", b"\xff\xfe", b"online " + b"x" * 65):
        assert parse_presence(bad) is None


def test_broker_urls_and_passwords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = LinkSettings.from_url("mqtts://broker.local")
    assert (s.host, s.port, s.tls) == ("broker.local", 8883, True)
    s = LinkSettings.from_url("mqtt://agg@10.0.0.2:1884")
    assert (s.host, s.port, s.tls, s.username) == ("10.0.0.2", 1884, False, "agg")
    for bad in ("http://x:1", "mqtt://:1883", "mqtt://h:notaport"):
        with pytest.raises(UserError):
            LinkSettings.from_url(bad)
    with pytest.raises(UserError, match="password"):
        LinkSettings.from_url("mqtt://u:secret@h:1883")
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_password("mqtt-password") == "s3cret"
    assert read_password(tmp_path / "mqtt-password") == "s3cret"
    with pytest.raises(UserError, match="password file"):
        read_password("missing")


def test_bad_agent_config_names_field_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("client_id: pi-01\ncamera:\n  source: '0'\n  fps: 500\n")
    res = CliRunner().invoke(agent_main, ["--config", str(cfg), "--validate-config"])
    assert res.exit_code == 2
    assert "line 4" in res.output and "camera.fps" in res.output
    cfg.write_text("client_id: pi-01\nbroker:\n  url: mqtt://h:1883\n  colour: blue\n")
    with pytest.raises(UserError, match=r"line 4: broker\.colour"):
        load_config(cfg)
    cfg.write_text("client_id: pi-01\nbroker:\n  password: hunter2\n")
    with pytest.raises(UserError, match="password_file"):
        load_config(cfg)
    cfg.write_text("client_id: 'pi 01'\n")  # a space is not allowed in a topic
    with pytest.raises(UserError, match="client_id"):
        load_config(cfg)
    cfg.write_text("camera: {fps: 10}\n")  # no client_id: the host name, made topic-safe
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", load_config(cfg).client_id)
    # Flags override the file.
    ok = load_config(cfg, {"client_id": "pi-02", "camera.fps": 30, "broker.url": None})
    assert (ok.client_id, ok.camera.fps, ok.broker.url) == ("pi-02", 30, "mqtt://127.0.0.1:1883")


@pytest.mark.parametrize(
    "path", sorted((REPO / "firmware_configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_firmware_configs_validate(path: Path) -> None:
    res = CliRunner().invoke(agent_main, ["--config", str(path), "--validate-config"])
    assert res.exit_code == 0, res.output


def test_serve_user_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text("rounds: 0\n")
    res = CliRunner().invoke(serve, ["--config", str(bad), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "rounds" in res.output
    res = CliRunner().invoke(serve, ["--broker", "http://x", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "broker URL" in res.output


def test_link_is_ready_only_once_the_broker_acknowledged_its_subscriptions(
    mosquitto: Mosquitto,
) -> None:
    """A worker says it listens (and rank 0 announces) only after its SUBACK: before that, a
    JOIN published on another connection may reach nobody (a lost JOIN stalled the join)."""
    order: list[str] = []
    link = MqttLink(LinkSettings.from_url(mosquitto.url), "slow-suback", "t/run/w/status",
                    ["t/run/+/up"], lambda _t, _p: None)  # fmt: skip
    acked = link._client.on_subscribe

    def late_ack(*args: Any) -> None:  # paho's thread: the SUBACK is read, then handled late
        time.sleep(1.0)
        order.append("suback")
        if acked is not None:
            acked(*args)

    link._client.on_subscribe = late_ack
    link.start()
    try:
        assert link.wait_connected(15)
        order.append("ready")
        assert order == ["suback", "ready"]
    finally:
        link.close()


def test_a_new_process_on_a_dead_ones_session_still_gets_the_aggregators_status(
    mosquitto: Mosquitto,
) -> None:
    """A killed agent restarted at once takes over its session, whose subscriptions the broker
    kept: MQTT 5 then sends no retained message, and without the aggregator's `online` the new
    process never JOINed (its round waited out the timeout). Topics in `always_retained` get
    their retained message on every connect; the others still only on a new subscription."""
    status, other = "t/run/aggregator/status", "t/run/aggregator/global"
    pub = MqttLink(LinkSettings.from_url(mosquitto.url), "pub", "t/run/pub/status", [],
                   lambda _t, _p: None)  # fmt: skip
    pub.start()
    assert pub.wait_connected(10)
    pub.publish(status, b"online abc", retain=True)
    pub.publish(other, b"weights", retain=True)
    got: list[tuple[str, str, bytes]] = []

    def link(name: str) -> MqttLink:
        return MqttLink(LinkSettings.from_url(mosquitto.url), "agent-x", "t/run/x/status",
                        [status, other], lambda t, p: got.append((name, t, p)),
                        always_retained=[status])  # fmt: skip

    def until(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    first = link("first")
    first.start()
    try:
        assert first.wait_connected(10)
        until(2)
        assert sorted(got) == [("first", other, b"weights"), ("first", status, b"online abc")]
        first._client.loop_stop()  # the process dies: no DISCONNECT, the session stays
        first._client.socket().close()
        second = link("second")
        second.start()
        try:
            assert second.wait_connected(10)
            until(3)
            time.sleep(0.5)  # the kept subscription's retained message would come by now
            assert got[2:] == [("second", status, b"online abc")]
        finally:
            second.close()
    finally:
        pub.close()


def test_an_agent_follows_a_resumed_aggregator_back_to_its_checkpointed_round(
    small_synth: Any,
) -> None:
    """An aggregator killed just after its checkpoint may already have started the next round
    (wire round 17, say); the same command resumed starts it again (round 16). The agents then
    refused every message of that round as older than one they had seen, and the resumed
    round trained no one until its timeout. A new aggregator instance resets the floor; within
    one instance an older round is still refused."""
    from splitfed.algorithms.sflv1 import SFLV1

    model, train = ModelConfig(widths=(8, 16, 16), cut=1), TrainConfig(syncs_per_round=1)
    _, _, shards = client_shards(small_synth, 2, seed=0)
    agent = Agent(ClientRuntime("client-00", "r", *shards[0]), LinkSettings(), "splitfed", "r")
    algo = SFLV1(model, train, 0)
    algo.enrol(["client-00"])
    weights = prefixed(state_to_numpy(build_split_model(model, 0)[0]), CLIENT_PREFIX)

    def round_start(seq: Sequencer, rnd: int) -> None:
        msg = seq.make(MsgType.ROUND_START, rnd, algo.round_body("client-00"), weights)
        agent._dispatch("client-00", DOWN, encode(msg), None)

    agent._dispatch(AGGREGATOR_ID, STATUS, b"online first", None)
    dead, resumed = Sequencer(AGGREGATOR_ID, "r"), Sequencer(AGGREGATOR_ID, "r")
    round_start(dead, 17)
    assert agent.counters["sent_smashed"] == 1 and agent.runtime.rejected == 0
    resumed.seq = dead.seq + 1000  # its sequence numbers grow across restarts (serve.py)
    round_start(resumed, 16)  # before its status: the old instance's floor holds
    assert agent.runtime.rejected_by_reason == {"other_round": 1}
    agent._dispatch(AGGREGATOR_ID, STATUS, b"online second", None)
    assert agent.counters["joins"] == 2
    round_start(resumed, 16)
    assert agent.counters["sent_smashed"] == 2 and agent.runtime.rejected == 1
    round_start(resumed, 15)  # the floor is back for the new instance
    assert agent.runtime.rejected_by_reason == {"other_round": 2}


def test_link_is_never_connected_without_a_broker_and_reconnects(tmp_path: Path) -> None:
    port = free_port()
    got: list[bytes] = []
    settings = LinkSettings(port=port, reconnect_min=1, reconnect_max=2)
    link = MqttLink(settings, "probe", "t/run/probe/status", ["t/run/probe/down"],
                    lambda _t, p: got.append(p))  # fmt: skip
    link.start()
    try:
        time.sleep(1.5)
        assert not link.online()  # nothing listens: not connected, whatever paho queued
        broker = Mosquitto(tmp_path / "mq", port)
        broker.start()
        try:
            assert link.wait_connected(15), "no reconnect after the broker came up"
            assert link.publish("t/run/probe/down", b"hello")
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
            assert got == [b"hello"]  # subscribed in on_connect
        finally:
            link.close()
            broker.stop()
    finally:
        link.close()


# ---- TLS, logins, the embedded broker, enrolment -----------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate and client certificates from scripts/make_test_certs.sh."""
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([str(REPO / "scripts" / "make_test_certs.sh"), str(d), "c0", "c1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return d


def test_tls_settings_are_checked_before_connecting(certs: Path) -> None:
    files = {"ca_file": "ca.crt", "cert_file": "c0.crt", "key_file": "c0.key"}
    ok = LinkSettings.from_url("mqtts://127.0.0.1", **{k: str(certs / v) for k, v in files.items()})
    ok.check()
    ctx = ok.ssl_context()
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    (certs / "junk.pem").write_text("not a certificate\n")
    bad = {
        "No such file": {"ca_file": str(certs / "missing.crt")},
        "TLS CA file .*junk.pem": {"ca_file": str(certs / "junk.pem")},
        "KEY_VALUES_MISMATCH": {"cert_file": str(certs / "c0.crt"),
                                "key_file": str(certs / "c1.key")},
        "key is missing": {"cert_file": str(certs / "c0.crt")},  # no key in the certificate
        "needs its certificate": {"key_file": str(certs / "c0.key")},
    }  # fmt: skip
    for message, files in bad.items():
        with pytest.raises(UserError, match=message):
            LinkSettings.from_url("mqtts://127.0.0.1", **files).check()
    with pytest.raises(UserError, match="mqtts://"):
        LinkSettings.from_url("mqtt://127.0.0.1", ca_file=str(certs / "ca.crt")).check()
    with pytest.raises(UserError, match="user name"):
        LinkSettings.from_url("mqtt://127.0.0.1", password="x").check()


def test_mqtt_settings_build_the_link(certs: Path, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = load_config(None, {
        "client_id": "c0", "broker.url": "mqtts://broker.local", "broker.username": "c0",
        "broker.password_file": str(tmp_path / "pw"), "broker.tls.ca_file": str(certs / "ca.crt"),
        "broker.tls.cert_file": str(certs / "c0.crt"), "broker.tls.key_file": str(certs / "c0.key"),
    })  # fmt: skip
    s = cfg.broker.link_settings(cfg.broker.url)
    assert (s.host, s.port, s.tls, s.username, s.password) == ("broker.local", 8883, True, "c0",
                                                                "s3cret")  # fmt: skip
    assert s.cert_file == str(certs / "c0.crt")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        read_password(tmp_path / "empty")


@pytest.mark.parametrize("app", ["agent", "serve"])
def test_bad_tls_files_are_one_line_exit_2(app: str, certs: Path, tmp_path: Path) -> None:
    flags = ["--broker", "mqtts://127.0.0.1:1", "--tls-ca", str(certs / "ca.crt"),
             "--tls-cert", str(certs / "c0.crt"), "--tls-key", str(certs / "c1.key")]  # fmt: skip
    if app == "agent":
        res = CliRunner().invoke(agent_main, [*flags, "--client-id", "c0", "--dataset", "synth"])
    else:
        res = CliRunner().invoke(serve, [*flags, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "KEY_VALUES_MISMATCH" in lines[0], res.output


def test_embedded_broker_refuses_open_listening_before_binding(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    port = free_port()
    with pytest.raises(UserError, match="--insecure"):
        EmbeddedBroker("0.0.0.0", port).start()
    with socket.socket() as s:  # nothing was bound: the port is still free on every interface
        s.bind(("0.0.0.0", port))
    EmbeddedBroker("0.0.0.0", port, insecure=True).check()
    users = tmp_path / "users"
    add_user(users, "aggregator", "pw")
    EmbeddedBroker("0.0.0.0", port, users_file=users).check()
    assert users.stat().st_mode & 0o077 == 0
    (tmp_path / "bad").write_text("# users\naggregator:plaintext\n")
    with pytest.raises(UserError, match="line 2"):
        EmbeddedBroker("127.0.0.1", port, users_file=tmp_path / "bad").check()
    res = CliRunner().invoke(serve, ["--listen", f"0.0.0.0:{port}", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--insecure" in res.output, res.output
    res = CliRunner().invoke(serve, ["--broker", "mqtt://127.0.0.1:1", "--insecure",
                                     "--out", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 2 and "embedded broker" in res.output, res.output


def _paho(port: int, user: str | None, password: str | None, name: str) -> tuple[Any, list[Any]]:
    """A connected (or refused) paho client and the events it saw: CONNACK codes, disconnects."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    if user is not None:
        c.username_pw_set(user, password)
    events: list[Any] = []
    answered = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        events.append(rc)
        answered.set()

    c.on_connect = on_connect
    c.on_disconnect = lambda *_a: events.append("disconnected")
    c.reconnect_delay_set(30, 60)  # no reconnect within the test: a disconnect stays visible
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert answered.wait(10), f"{name}: no CONNACK"
    return c, events


def test_embedded_broker_logins_and_size_limit(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "aggregator", "agg-pw")
    add_user(users, "c0", "c0-pw")
    port = free_port()
    limit = 64 * 1024
    got: list[int] = []
    with EmbeddedBroker("127.0.0.1", port, users_file=users, max_message_bytes=limit):
        _, anon = _paho(port, None, None, "anon")
        _, wrong = _paho(port, "c0", "nope", "wrong")
        assert anon[0].is_failure and wrong[0].is_failure
        sub, ev = _paho(port, "aggregator", "agg-pw", "sub")
        assert not ev[0].is_failure
        sub.on_message = lambda _c, _u, m: got.append(len(m.payload))
        sub.subscribe("t/#", qos=1)
        pub, pub_ev = _paho(port, "c0", "c0-pw", "pub")
        time.sleep(0.3)
        pub.publish("t/big", b"x" * (limit + 1), qos=0)
        deadline = time.monotonic() + 10
        while "disconnected" not in pub_ev and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "disconnected" in pub_ev, "an oversized PUBLISH did not end the connection"
        pub2, _ = _paho(port, "c0", "c0-pw", "pub2")
        pub2.publish("t/ok", b"y" * limit, qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in (sub, pub, pub2):
            c.disconnect()
            c.loop_stop()
    assert got == [limit]  # the message at the limit passed, the one over it never did
    assert EmbeddedBroker().max_message_bytes == MAX_MESSAGE_BYTES


def test_broker_add_user_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO("pw1\n"))
    assert broker_main(["add-user", str(users), "pi-01"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("pw2\n"))
    assert broker_main(["add-user", str(users), "pi-02"]) == 0
    assert set(read_users(users)) == {"pi-01", "pi-02"}
    assert broker_main(["add-user", str(users), "bad/name"]) == 2
    assert broker_main(["nonsense"]) == 2


def test_allow_list_file(tmp_path: Path) -> None:
    f = tmp_path / "allow"
    f.write_text("# enrolled devices\npi-01\n  pi-02   # kitchen\n\npi-01\n")
    assert load_allow_list(f) == frozenset({"pi-01", "pi-02"})
    f.write_text("pi-01\npi 02\n")
    with pytest.raises(UserError, match="line 2"):
        load_allow_list(f)
    f.write_text("# nobody\n")
    with pytest.raises(UserError, match="names no client"):
        load_allow_list(f)
    with pytest.raises(UserError, match="cannot read"):
        load_allow_list(tmp_path / "missing")


def test_only_enrolled_clients_join() -> None:
    """A JOIN from an id outside the allow list is dropped unparsed and counted by reason."""
    from splitfed.client import ClientRuntime
    from splitfed.config import TrainConfig
    from splitfed.data.dataset import EmotionDataset
    from splitfed.model import ModelConfig
    from splitfed.transport import InProcessTransport

    model = ModelConfig()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (14, *model.input_shape), dtype=np.uint8)
    data = EmotionDataset("t", images, np.arange(14) % 7)
    runtimes = [ClientRuntime(cid, "run", data) for cid in ("c0", "c2", "c1")]
    transport = InProcessTransport(runtimes)  # queues each runtime's JOIN
    io_ = ServeIO(transport, "run", model, TrainConfig(), allowed=frozenset({"c0", "c1"}))
    io_.wait_for_clients(2, timeout=5)
    assert sorted(io_.clients) == ["c0", "c1"]
    assert io_.rejected == {NOT_ENROLLED: 1}
    assert io_.trainers() == ["c0", "c1"]


def test_link_over_mutual_tls_says_why_a_handshake_fails(
    tls_mosquitto: TlsMosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = tls_mosquitto
    other = tmp_path / "other-ca"  # a CA the broker's certificate does not come from
    subprocess.run([str(REPO / "scripts" / "make_test_certs.sh"), str(other), "c0"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip

    def link(ca: Path) -> MqttLink:
        s = LinkSettings.from_url(b.url, ca_file=str(ca), cert_file=str(b.certs / "c0.crt"),
                                  key_file=str(b.certs / "c0.key"),
                                  password=read_password(b.password_files["c0"]),
                                  reconnect_min=1, reconnect_max=1)  # fmt: skip
        s.username = "c0"
        s.check()
        return MqttLink(s, f"c0-probe-{ca.parent.name}", "splitfed/r/c0/status", [],
                        lambda _t, _p: None)  # fmt: skip

    caplog.set_level("WARNING", logger="splitfed.mqtt")
    bad = link(other / "ca.crt")
    bad.start()
    try:
        assert not bad.wait_connected(3)
    finally:
        bad.close()
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert caplog.text.count("CERTIFICATE_VERIFY_FAILED") == 1  # said once, not per retry
    good = link(b.certs / "ca.crt")
    good.start()
    try:
        assert good.wait_connected(10)
        assert good.publish("splitfed/r/c0/up", b"x")
    finally:
        good.close()
