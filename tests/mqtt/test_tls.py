"""Mutual TLS and the per-device ACL, end to end: serve + 2 agents over Mosquitto as deployed.

The broker requires TLS with a client certificate, a password for every user and the shipped
ACL (systemd/mosquitto/splitfed.acl.example). While a real round runs, device c0 tries what
a compromised device would: read c1's topics and publish on c1's up topic. A device c2 that
holds a valid certificate but is not on `--allow-clients` tries to join. None of it may reach
the aggregator or c0.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.serve_io import NOT_ENROLLED
from splitfed.model import ModelConfig
from splitfed.mqtt import parse_topic
from splitfed.wire import MsgType, Sequencer, decode, encode

from .conftest import TlsMosquitto
from .fed import AGENT_CMD, IDENTITIES, THREADS, Procs, read_metrics, serve_cmd

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

RUN = "tls"
PREFIX = "splitfed"  # the ACL example's first topic level


class Peer:
    """A paho MQTT 5 client that records CONNACK, SUBACK and PUBACK codes and what it receives."""

    def __init__(
        self,
        port: int,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        user: str | None = None,
        password_file: Path | None = None,
        tls: bool = True,
        name: str = "peer",
    ) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.time_ns()}",
                             protocol=mqtt.MQTTv5)  # fmt: skip
        if user is not None:
            password = password_file.read_text().strip() if password_file else None
            self.c.username_pw_set(user, password)
        if tls:
            ctx = ssl.create_default_context(cafile=str(ca))
            if cert is not None:
                ctx.load_cert_chain(str(cert), str(key))
            self.c.tls_set_context(ctx)
        self.connack: list[Any] = []
        self.suback: list[Any] = []
        self.puback: dict[int, Any] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.answered = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda _c, _u, _m, codes, _p: self.suback.extend(codes)
        self.c.on_publish = self._on_publish
        self.c.on_message = self._on_message
        self.error: Exception | None = None
        try:
            self.c.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError) as e:  # a refused TLS handshake may surface here
            self.error = e
            return
        self.c.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connack.append(rc)
        self.answered.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.lock:
            self.puback[mid] = rc

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def connected(self, timeout: float = 5.0) -> bool:
        """True only for a successful CONNACK; a refused or dropped connection is False."""
        if self.error is not None:
            return False
        self.answered.wait(timeout)
        return bool(self.connack) and not self.connack[0].is_failure

    def publish(self, name: str, payload: bytes, timeout: float = 5.0) -> Any:
        """PUBLISH at QoS 1 and return the broker's PUBACK reason code."""
        info = self.c.publish(name, payload, qos=1)
        info.wait_for_publish(timeout)
        with self.lock:
            return self.puback.get(info.mid)

    def wait_for(
        self, pred: Callable[[str, bytes], bool], timeout: float, alive: Callable[[], None]
    ) -> bool:
        """True once a received message matches `pred`; `alive()` fails the test early."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive()
            with self.lock:
                if any(pred(t, p) for t, p in self.messages):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> list[tuple[str, bytes]]:
        """Disconnect; returns everything received."""
        self.c.disconnect()
        self.c.loop_stop()
        with self.lock:
            return list(self.messages)


def agent(broker: TlsMosquitto, cid: str, shard: str) -> list[str]:
    return [*AGENT_CMD, "--broker", broker.url, *broker.tls_flags(cid), "--client-id", cid,
            "--dataset", "synth", "--synth-identities", str(IDENTITIES), "--shard", shard,
            "--seed", "0", "--threads", str(THREADS), "--run-id", RUN,
            "--exit-when-done"]  # fmt: skip


def test_mutual_tls_acl_and_enrolment(
    tls_mosquitto: TlsMosquitto, procs: Procs, tmp_path: Path
) -> None:
    b = tls_mosquitto
    certs = b.certs
    ca = certs / "ca.crt"

    # Refused before anything runs: plain MQTT, TLS without a certificate, a wrong password.
    plain = Peer(b.port, ca, user="c0", password_file=b.password_files["c0"], tls=False)
    assert not plain.connected(3), "a plain (non-TLS) connection was accepted"
    no_cert = Peer(b.port, ca, user="c0", password_file=b.password_files["c0"])
    assert not no_cert.connected(3), "a TLS connection without a client certificate was accepted"
    (tmp_path / "wrong").write_text("not-the-password\n")
    wrong = Peer(b.port, ca, certs / "c0.crt", certs / "c0.key", "c0", tmp_path / "wrong")
    assert not wrong.connected(3), "a wrong password was accepted"
    for p in (plain, no_cert, wrong):
        p.close()

    # The aggregator's view of the broker: logged in as it, the ACL lets it read everything.
    tap = Peer(b.port, ca, certs / "aggregator.crt", certs / "aggregator.key", "aggregator",
               b.password_files["aggregator"], name="tap")  # fmt: skip
    assert tap.connected()
    tap.c.subscribe("#", qos=1)
    allow = tmp_path / "allow.txt"
    allow.write_text("# devices that may train\nc0\nc1  # the second one\n\n")
    out = tmp_path / "out"
    procs.start("aggregator", serve_cmd(out, b.url, "sflv1", 2, 1, RUN, *b.tls_flags("aggregator"),
                                        "--allow-clients", str(allow),
                                        "--round-timeout", "120"))  # fmt: skip
    online = f"{PREFIX}/{RUN}/aggregator/status"
    assert tap.wait_for(lambda t, p: t == online and p.startswith(b"online"), 60,
                        lambda: procs.check_alive("aggregator")), procs.logs()  # fmt: skip

    # c0, as a compromised device would: subscribe to everything, speak on c1's up topic.
    spy = Peer(b.port, ca, certs / "c0.crt", certs / "c0.key", "c0", b.password_files["c0"],
               name="c0-spy")  # fmt: skip
    assert spy.connected()
    spy.c.subscribe([("#", 1), (f"{PREFIX}/{RUN}/c1/#", 1)])
    forged = b"forged by c0 on c1's topic"
    assert spy.publish(f"{PREFIX}/{RUN}/c1/up", forged).is_failure  # "Not authorized"
    # c2: a valid certificate (its CN is its user name on this listener) but not enrolled.
    c2 = Peer(b.identity_port, ca, certs / "c2.crt", certs / "c2.key", name="c2")
    assert c2.connected()
    body = {"client_id": "c2", "n_train": 100, "n_test": 10, "class_counts": [1] * 7,
            "input_shape": list(ModelConfig().input_shape)}  # fmt: skip
    join = encode(Sequencer("c2", RUN).make(MsgType.JOIN, 0, body))
    assert not c2.publish(f"{PREFIX}/{RUN}/c2/up", join).is_failure  # its own topic: allowed
    assert c2.publish(f"{PREFIX}/{RUN}/c1/up", forged).is_failure

    procs.start("c0", agent(b, "c0", "0/2"))
    procs.start("c1", agent(b, "c1", "1/2"))
    assert procs.wait("aggregator", 150) == 0, procs.logs()
    for cid in ("c0", "c1"):
        assert procs.wait(cid, 60) == 0, procs.logs()
    time.sleep(0.5)
    spied = spy.close()
    c2.close()
    seen = tap.close()

    metrics = read_metrics(out)
    assert len(metrics["rounds"]) == 1
    assert sorted(metrics["rounds"][0]["clients"]) == ["c0", "c1"]
    # The enrolment check dropped c2's JOIN; the forged message never arrived to be rejected.
    rejected = metrics["comm"]["rejected_by_reason"]
    assert set(rejected) == {NOT_ENROLLED} and rejected[NOT_ENROLLED] >= 1, rejected
    assert metrics["comm"]["transport_dropped"] == 0

    # The aggregator's view (the tap) saw c1's real traffic and c2's JOIN, never the forgery.
    kinds = {parse_topic(PREFIX, RUN, t) for t, _ in seen}
    assert {("c1", "up"), ("c1", "down"), ("c0", "up"), ("c2", "up")} <= kinds
    assert all(p != forged for _, p in seen)
    for t, p in seen:
        if t == f"{PREFIX}/{RUN}/c1/up" and p:
            assert decode(p).src == "c1"

    # c0 received only what the ACL grants it: its own down topic and the aggregator's
    # presence and retained weights; nothing of c1's, though c1 was training meanwhile.
    got = {t for t, _ in spied}
    own = {f"{PREFIX}/{RUN}/c0/down", f"{PREFIX}/{RUN}/aggregator/status",
           f"{PREFIX}/{RUN}/aggregator/global"}  # fmt: skip
    assert got <= own, got - own
    assert f"{PREFIX}/{RUN}/c0/down" in got and f"{PREFIX}/{RUN}/aggregator/global" in got
