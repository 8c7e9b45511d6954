"""MQTT for the federation: topics, one resilient connection, and the aggregator's Transport.

Every topic sits under one prefix: `<prefix>/<run>/<client_id>/<kind>`.

| kind         | direction          | payload                                 | QoS | retained |
|--------------|--------------------|-----------------------------------------|-----|----------|
| `up`         | agent -> aggregator| wire messages (`splitfed.wire`)         | 1   | no       |
| `down`       | aggregator -> agent| wire messages                           | 1   | no       |
| `status`     | anyone             | `online`, `offline` (last will), `stopped` | 1 | yes      |
| `global`     | aggregator -> all  | GLOBAL_WEIGHTS wire message (versioned) | 1   | yes      |
| `prediction` | agent -> anyone    | JSON: the emotion of a live frame       | 0   | no       |
| `assign`     | aggregator worker  | `<rank>/<world size>`: the agent's home worker | 1 | yes  |
| `weights`    | agent -> fed server| CLIENT_UPDATE with the client half      | 1   | no       |
| `sync`       | main <-> fed server| FED_ROUND / FED_PUBLISHED (round sync)  | 1   | no       |

With a separate fed server (`aggregator fed-server`, client id `fed-server`) the client halves
travel only on `weights` and the fed server's own `global`; the main server never subscribes
to them, and the shipped ACL denies its user reading them.

One topic per direction keeps each agent's messages in order (MQTT orders per topic). The
aggregator's own topics use the client id `aggregator`; its `online` status carries an instance
id (`online <hex>`) so that agents re-join a restarted aggregator but not a reconnected one.

`MqttLink` is one paho 2.x connection with availability, a persistent session (MQTT 5 session
expiry or 3.1.1 clean_session=False), reconnect with backoff, subscriptions made in `on_connect`
and a bounded outgoing queue. `MqttTransport` puts it under `ServerIO` on the aggregator.

Nothing here needs one broker node: state that outlives a connection is retained messages
(status, global weights, homes) and persistent sessions, which clustered brokers (EMQX,
VerneMQ) replicate or hand over between nodes; order is only ever relied on per topic and
publisher, which they keep; QoS is 1 throughout; nothing reads a broker's own topics ($SYS).
`shared_group` puts the aggregator's subscriptions under an MQTT 5 shared subscription
(`$share/<group>/<filter>`), which a cluster may serve from any node; a shared subscription
gets no retained messages, so presence then comes from live status changes and JOINs only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field

from splitfed.errors import UserError
from splitfed.server import AGGREGATOR_ID
from splitfed.transport import Incoming, Transport
from splitfed.wire import FED_SERVER_ID, MAX_MESSAGE_BYTES, RejectLog

log = logging.getLogger(__name__)


class TLSSettings(BaseModel):
    """TLS files for `mqtts://`; a certificate and key make it mutual TLS (per-device identity)."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = Field(
        None, description="CA certificate (PEM) that signed the broker's; None = the system's CAs"
    )
    cert_file: Path | None = Field(
        None, description="this client's certificate (PEM), for brokers that require one"
    )
    key_file: Path | None = Field(
        None, description="the private key (PEM, unencrypted) of cert_file, if not inside it"
    )


class MqttSettings(BaseModel):
    """The MQTT settings that the aggregator and the agents share; each app adds its own."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field("splitfed", pattern=r"^[A-Za-z0-9_-]+$", description="topic prefix")
    run_id: str = Field("default", pattern=r"^[A-Za-z0-9_-]+$", description="training run")
    username: str | None = Field(None, description="MQTT user name")
    password_file: str | None = Field(
        None,
        description="file with the MQTT password; relative names resolve in $CREDENTIALS_DIRECTORY",
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description="MQTT version; auto tries 5 and falls back to 3.1.1"
    )
    tls: TLSSettings = Field(default_factory=TLSSettings, description="TLS files for mqtts://")

    def link_settings(self, url: str, **kw: Any) -> LinkSettings:
        """Settings to reach `url` as this config says: user, password (from its file), TLS.

        Everything is checked here, before any connection, so that a missing or bad file is one
        line of error (UserError) at start-up rather than a retry loop in the background.
        """
        t = self.tls
        s = LinkSettings.from_url(
            url, protocol=self.protocol, password=read_password(self.password_file),
            ca_file=str(t.ca_file) if t.ca_file else None,
            cert_file=str(t.cert_file) if t.cert_file else None,
            key_file=str(t.key_file) if t.key_file else None, **kw,
        )  # fmt: skip
        if self.username:
            s.username = self.username
        s.check()
        return s


ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
UP, DOWN, STATUS, GLOBAL, PREDICTION = "up", "down", "status", "global", "prediction"
ASSIGN = "assign"  # several aggregator workers (splitfed.distributed): which one hosts an agent
WEIGHTS, SYNC = "weights", "sync"  # with a separate fed server (aggregator/fed_server.py)
KINDS = (UP, DOWN, STATUS, GLOBAL, PREDICTION, ASSIGN, WEIGHTS, SYNC)
PRESENCE_STATES = ("online", "offline", "stopped")
Protocol = Literal["auto", "5", "3.1.1"]


# ---- topics ------------------------------------------------------------------------------------


def topic(prefix: str, run_id: str, client_id: str, kind: str) -> str:
    """`<prefix>/<run>/<client_id>/<kind>`; every part is checked, as topics come from config."""
    for part, what in ((prefix, "prefix"), (run_id, "run id"), (client_id, "client id")):
        if not ID_RE.match(part):
            raise ValueError(f"bad {what} {part!r}: use 1-64 of A-Z a-z 0-9 _ -")
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{prefix}/{run_id}/{client_id}/{kind}"


def parse_topic(prefix: str, run_id: str, name: str) -> tuple[str, str] | None:
    """(client_id, kind) of a topic of this run, or None for anything else."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[1] != run_id:
        return None
    if not ID_RE.match(parts[2]) or parts[3] not in KINDS:
        return None
    return parts[2], parts[3]


def parse_presence(payload: bytes) -> tuple[str, str] | None:
    """(state, instance) of a status payload (`online`, `online <id>`, `offline`, `stopped`)."""
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    state, _, instance = text.partition(" ")
    if state not in PRESENCE_STATES or len(instance) > 64 or " " in instance:
        return None
    return state, instance


# ---- connection settings -----------------------------------------------------------------------


@dataclass
class LinkSettings:
    """Where and how to connect; built from `mqtt://` URLs and the apps' configs."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: Protocol = "auto"
    keepalive: int = 10
    session_expiry: int = 3600
    reconnect_min: int = 1
    reconnect_max: int = 8
    max_queued: int = 4096
    max_inflight: int = 100

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> LinkSettings:
        """`mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]` (TLS); other settings as keywords."""
        p = urlparse(url if "://" in url else f"mqtt://{url}")
        if p.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not p.hostname:
            raise UserError(f"bad broker URL {url!r}: use mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = p.scheme in ("mqtts", "ssl")
        try:
            port = p.port or (8883 if tls else 1883)
        except ValueError:
            raise UserError(f"bad port in broker URL {url!r}") from None
        if p.password:
            raise UserError("put the MQTT password in a file (password_file), not in the URL")
        return cls(host=p.hostname, port=port, tls=tls, username=p.username or None, **kw)

    def check(self) -> None:
        """Refuse contradictory settings and unreadable TLS files, each in one line (UserError)."""
        files = [f for f in (self.ca_file, self.cert_file, self.key_file) if f]
        if files and not self.tls:
            raise UserError(
                f"TLS files given but the broker mqtt://{self.host}:{self.port} is plain MQTT: "
                "use an mqtts:// URL (default port 8883)"
            )
        if self.password is not None and not self.username:
            raise UserError("an MQTT password needs a user name (--username or username)")
        if self.tls:
            self.ssl_context()

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2 or later, the broker's certificate and host name verified, our own if given.

        Built here rather than by paho's `tls_set` so that the minimum version is pinned and a
        bad file is named in the error.
        """
        if self.key_file and not self.cert_file:
            raise UserError("a TLS key needs its certificate (--tls-cert or tls.cert_file)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.ca_file:
                ctx.load_verify_locations(cafile=self.ca_file)
            else:
                ctx.load_default_certs()
        except OSError as e:  # ssl.SSLError is an OSError too, without a file name
            reason = _tls_reason(e)
            raise UserError(f"cannot load the TLS CA file {self.ca_file}: {reason}") from None
        if self.cert_file:
            try:
                # A passphrase prompt would hang a service: encrypted keys fail instead.
                ctx.load_cert_chain(self.cert_file, self.key_file, password=lambda: b"")
            except OSError as e:
                what = f"{self.cert_file}" + (f" / {self.key_file}" if self.key_file else "")
                raise UserError(
                    f"cannot load the TLS certificate and key {what}: {_tls_reason(e)}"
                ) from None
        return ctx


def _tls_reason(e: OSError) -> str:
    """The short reason of an ssl/OS error ("No such file or directory", "KEY_VALUES_MISMATCH")."""
    if isinstance(e, ssl.SSLError):
        # OpenSSL's "PEM lib" (no reason code) covers garbage, a missing and an encrypted key.
        return str(e.reason or "not valid PEM, or the key is missing or encrypted")
    return e.strerror or str(e)


def read_password(path: str | Path | None) -> str | None:
    """The password in `path`; relative names resolve in $CREDENTIALS_DIRECTORY (systemd)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute():
        base = os.environ.get("CREDENTIALS_DIRECTORY")
        if base:
            p = Path(base) / p
    try:
        password = p.read_text().rstrip("\r\n")
    except OSError as e:
        raise UserError(f"cannot read the MQTT password file {p}: {e.strerror}") from None
    if not password:
        raise UserError(f"the MQTT password file {p} is empty")
    return password


# ---- one connection ----------------------------------------------------------------------------


class MqttLink:
    """One MQTT connection that announces itself, keeps its session and reconnects.

    `online()` is true only between a successful CONNACK and the next disconnect: a failed
    reason code is logged and never counted as connected. Messages go to `on_message(topic,
    payload)` on paho's network thread; keep that callback short.
    """

    def __init__(
        self,
        settings: LinkSettings,
        mqtt_id: str,
        status_topic: str,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes], None],
        online_payload: bytes | None = b"online",
        always_retained: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.mqtt_id = mqtt_id
        self.status_topic = status_topic
        self.subscriptions = list(subscriptions)
        # Subscriptions whose retained message comes on every connect, session or not: a new
        # process on the session of one that died gets no retained message otherwise (MQTT 5
        # retain handling 1), and would not know that the aggregator is online.
        self.always_retained = frozenset(always_retained)
        self.on_message = on_message
        self.online_payload = online_payload
        self.protocol = mqtt.MQTTv311 if settings.protocol == "3.1.1" else mqtt.MQTTv5
        self.connects = 0
        self.disconnects = 0
        self.publish_failures = 0
        self.unsent_disconnected = 0  # qos-0 messages dropped while no broker was connected
        self._unsent_logged = False  # said once per outage, then only counted
        self.connack_timeout = 3.0
        self._connected = threading.Event()
        # Set once the broker acknowledged the subscriptions made on the last connect: before
        # that, a message published by another client may reach no one here (the broker owes
        # no order between two connections' packets).
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._closing = False
        self._last_fail = ""  # reason of the last failed connection attempt, logged once
        self._lock = threading.Lock()
        self._client = self._make_client()

    # -- set-up --

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = self.protocol == mqtt.MQTTv5
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.mqtt_id,
            clean_session=None if v5 else False,
            protocol=self.protocol,
        )
        c.reconnect_delay_set(min_delay=s.reconnect_min, max_delay=s.reconnect_max)
        c.max_queued_messages_set(s.max_queued)
        c.max_inflight_messages_set(s.max_inflight)
        if s.username:
            c.username_pw_set(s.username, s.password)
        if s.tls:
            c.tls_set_context(s.ssl_context())
        c.will_set(self.status_topic, b"offline", qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._on_socket_open
        c.on_connect_fail = self._on_connect_fail
        return c

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        s = self.settings
        props = None
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry
        self._client.connect_async(
            s.host, s.port, keepalive=s.keepalive,
            clean_start=False if self.protocol == mqtt.MQTTv5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )  # fmt: skip
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Connected, and the broker acknowledged this connection's subscriptions (SUBACK):
        what another client publishes from now on reaches this link."""
        deadline = time.monotonic() + timeout
        return self._connected.wait(timeout) and self._subscribed.wait(
            max(0.0, deadline - time.monotonic())
        )

    def online(self) -> bool:
        return self._connected.is_set()

    # -- callbacks (paho's network thread) --

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.error(
                "MQTT broker %s:%d refused %s: %s",
                self.settings.host,
                self.settings.port,
                self.mqtt_id,
                rc,
            )
            if (
                str(rc) == "Unsupported protocol version"
                and self.settings.protocol == "auto"
                and self.protocol == mqtt.MQTTv5
                and not self.connects
            ):
                threading.Thread(target=self._downgrade, name="mqtt-downgrade", daemon=True).start()
            return
        self.connects += 1
        self._last_fail = ""
        log.info(
            "MQTT connected to %s:%d as %s (MQTT %s, session present: %s)",
            self.settings.host,
            self.settings.port,
            self.mqtt_id,
            "5" if self.protocol == mqtt.MQTTv5 else "3.1.1",
            bool(getattr(flags, "session_present", False)),
        )
        # Subscribe here, so that a reconnect restores the subscriptions.
        self._subscribed.clear()
        if self.subscriptions:
            if self.protocol == mqtt.MQTTv5:
                # retainHandling 1: retained messages only for a new subscription.
                once, always = SubscribeOptions(qos=1, retainHandling=1), SubscribeOptions(qos=1)
                _, self._sub_mid = client.subscribe(
                    [(t, always if t in self.always_retained else once) for t in self.subscriptions]
                )
            else:
                _, self._sub_mid = client.subscribe([(t, 1) for t in self.subscriptions])
        else:
            self._subscribed.set()
        if self.online_payload is not None:  # None: not announced yet (see `announce`)
            client.publish(self.status_topic, self.online_payload, qos=1, retain=True)
        self._unsent_logged = False
        self._connected.set()

    def _on_socket_open(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        # No Nagle: a batch's last segment and the small PUBACKs must not wait for an ACK.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not (self.protocol == mqtt.MQTTv5 and self.settings.protocol == "auto") or self.connects:
            return  # a broker that once took MQTT 5 still does (a restart is slow, not older)

        # Some MQTT 3.1.1 brokers (amqtt) never answer an MQTT 5 CONNECT that has properties:
        # no CONNACK within a few seconds of a TCP connection means "try 3.1.1".
        def check() -> None:
            if (not self._connected.is_set() and not self.connects and self._client is client
                    and not self._closing):  # fmt: skip
                log.info("no CONNACK to MQTT 5 from %s:%d", self.settings.host, self.settings.port)
                self._downgrade()

        t = threading.Timer(self.connack_timeout, check)
        t.daemon = True
        t.start()

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        # paho calls this inside its `except OSError`, and retries quietly: say why, once per
        # reason, so that a refused certificate is not an endless silent retry.
        err = sys.exc_info()[1]
        reason = _tls_reason(err) if isinstance(err, OSError) else "unknown error"
        if reason != self._last_fail:
            self._last_fail = reason
            log.warning(
                "MQTT connection to %s:%d failed (%s); retrying",
                self.settings.host,
                self.settings.port,
                reason,
            )

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            self.disconnects += 1
        if not self._closing and was:
            log.warning("MQTT %s disconnected (%s); reconnecting", self.mqtt_id, rc)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        refused = [str(c) for c in codes if getattr(c, "is_failure", False)]
        if refused:  # an ACL that denies a topic: say so, the link still runs for the rest
            log.error("MQTT broker refused %d subscription(s) of %s: %s", len(refused),
                      self.mqtt_id, ", ".join(refused))  # fmt: skip
        if mid == self._sub_mid:
            self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.on_message(msg.topic, msg.payload)
        except Exception:  # a bug in a handler must not kill paho's network thread
            log.exception("MQTT handler failed on %s", msg.topic)

    def _downgrade(self) -> None:
        """The broker speaks MQTT 3.1.1 only (e.g. amqtt): reconnect with that."""
        with self._lock:
            if self._closing or self.protocol == mqtt.MQTTv311:
                return
            old = self._client
            old.loop_stop()
            old.disconnect()
            log.info(
                "MQTT broker %s:%d speaks MQTT 3.1.1 only; using it",
                self.settings.host,
                self.settings.port,
            )
            self.protocol = mqtt.MQTTv311
            self._client = self._make_client()
            self.start()

    # -- use --

    def announce(self, payload: bytes) -> None:
        """Publish `payload` as this link's online status now and after every reconnect."""
        self.online_payload = payload
        self.publish(self.status_topic, payload, retain=True)

    def subscribe(self, name: str) -> None:
        """Add a subscription, kept across reconnects (made in `on_connect`)."""
        with self._lock:
            if name in self.subscriptions:
                return
            self.subscriptions.append(name)
        if self.online():
            self._client.subscribe(name, qos=1)

    def unsubscribe(self, name: str) -> None:
        with self._lock:
            if name not in self.subscriptions:
                return
            self.subscriptions.remove(name)
        if self.online():
            self._client.unsubscribe(name)

    def publish(self, name: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue one message; False (logged) when paho's bounded queue refused it."""
        try:
            info = self._client.publish(name, payload, qos=qos, retain=retain)
        except ValueError as e:  # oversized or bad topic
            self.publish_failures += 1
            log.error("MQTT publish to %s refused: %s", name, e)
            return False
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
            return True  # queued by paho, sent after the reconnect
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            # qos 0 with no broker (live predictions of an offline device): expected, so one
            # line per outage and a count, not an ERROR per frame.
            self.publish_failures += 1
            self.unsent_disconnected += 1
            if not self._unsent_logged:
                self._unsent_logged = True
                log.warning("no MQTT broker connected: %s and other qos-0 messages are dropped "
                            "and counted until it connects", name)  # fmt: skip
            return False
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.publish_failures += 1
            log.error("MQTT publish to %s failed: %s", name, mqtt.error_string(info.rc))
            return False
        return True

    def close(self, state: bytes = b"stopped", timeout: float = 5.0) -> None:
        """Say `stopped` (retained), flush, disconnect cleanly (no last will)."""
        with self._lock:
            self._closing = True
            client = self._client
        if self._connected.is_set():
            info = client.publish(self.status_topic, state, qos=1, retain=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and client.want_write():
                time.sleep(0.02)
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        client.disconnect()
        client.loop_stop()
        self._connected.clear()


# ---- the aggregator's transport ----------------------------------------------------------------

INBOX_ITEMS = 8192
INBOX_BYTES = 256 * 1024 * 1024
SENDER_ITEMS = 1024
SENDER_BYTES = 64 * 1024 * 1024
PRESENCE_BYTES = 64  # what a queued presence change is charged

T = TypeVar("T")


class FairInbox(Generic[T]):
    """A bounded inbox that serves its senders in turn.

    Bounded in items and in bytes, in total and per sender: a sender that floods fills its own
    share and then loses the excess (`put` says why, for the caller to count), while the other
    senders' messages still get in, and `get` takes one item from each waiting sender in turn.
    A sender's first queued item is admitted whenever the total allows, so that one large
    legitimate message is never refused for its size alone. Per-sender order is kept.
    """

    def __init__(
        self,
        max_items: int = INBOX_ITEMS,
        max_bytes: int = INBOX_BYTES,
        sender_items: int = SENDER_ITEMS,
        sender_bytes: int = SENDER_BYTES,
    ) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.sender_items = sender_items
        self.sender_bytes = sender_bytes
        self.items = 0
        self.bytes = 0
        self._queues: dict[str, deque[tuple[T, int]]] = {}
        self._queued_bytes: dict[str, int] = {}
        self._turn: deque[str] = deque()  # senders with something queued, the next one first
        self._cond = threading.Condition()

    def put(self, sender: str, item: T, size: int) -> str | None:
        """Queue `item` (charged `size` bytes); None when queued, else the reason it was not."""
        with self._cond:
            if self.items >= self.max_items:
                return "inbox_full"
            if self.bytes + size > self.max_bytes:
                return "inbox_bytes"
            q = self._queues.get(sender)
            if q is None:
                q = self._queues[sender] = deque()
                self._queued_bytes[sender] = 0
                self._turn.append(sender)
            elif len(q) >= self.sender_items or (
                self._queued_bytes[sender] + size > self.sender_bytes
            ):
                return "sender_over_budget"
            q.append((item, size))
            self._queued_bytes[sender] += size
            self.items += 1
            self.bytes += size
            self._cond.notify()
            return None

    def get(self, timeout: float) -> T | None:
        """The next item, taking senders in turn; None when nothing came within `timeout`."""
        with self._cond:
            if not self._turn and not self._cond.wait_for(lambda: bool(self._turn), timeout):
                return None
            sender = self._turn.popleft()
            q = self._queues[sender]
            item, size = q.popleft()
            self.items -= 1
            self.bytes -= size
            if q:
                self._queued_bytes[sender] -= size
                self._turn.append(sender)
            else:
                del self._queues[sender], self._queued_bytes[sender]
            return item

    def __len__(self) -> int:
        return self.items


class MqttTransport(Transport):
    """`Transport` over MQTT for `ServerIO`: one `up` topic per agent in, one `down` topic out.

    Incoming payloads are queued by paho's thread in a `FairInbox` (bounded in messages and
    bytes, per sender and in total, senders served in turn) and handed out by `recv`; anything
    that is not a message of this run (foreign topic, bad client id, bad status, oversized, no
    room) is dropped here, counted by reason in `dropped` and logged (rate-limited).
    """

    def __init__(
        self,
        settings: LinkSettings,
        prefix: str,
        run_id: str,
        max_payload: int = MAX_MESSAGE_BYTES,
        inbox_size: int = INBOX_ITEMS,
        presence_grace: float = 5.0,
        inbox_bytes: int = INBOX_BYTES,
        sender_inbox_size: int = SENDER_ITEMS,
        sender_inbox_bytes: int = SENDER_BYTES,
        owns: Callable[[str], bool] | None = None,
        worker: tuple[int, int] = (0, 1),
        shared_group: str | None = None,
    ) -> None:
        """`owns` and `worker` (rank, world size) make this one of several aggregator workers
        (`splitfed.distributed`): it takes only the agents `owns` names, and rank 0 alone is
        the `aggregator` agents see, announced by `announce()` once every worker listens.
        `shared_group`: subscribe as `$share/<group>/...` (worker R > 0: `<group>-wR`, as each
        worker must get its own agents' messages, never another worker's)."""
        if shared_group is not None and not ID_RE.match(shared_group):
            raise UserError(f"bad shared subscription group {shared_group!r}: use A-Z a-z 0-9 _ -")
        self.share = None
        if shared_group is not None:
            self.share = shared_group if worker[0] == 0 else f"{shared_group}-w{worker[0]}"
        self.prefix = prefix
        self.run_id = run_id
        self.max_payload = max_payload
        self.presence_grace = presence_grace
        self._offline: dict[str, float] = {}  # client -> when its `offline` takes effect
        self._offline_lock = threading.Lock()
        self.instance = uuid.uuid4().hex[:16]
        self.inbox: FairInbox[Incoming] = FairInbox(
            inbox_size, inbox_bytes, sender_inbox_size, sender_inbox_bytes
        )
        self.bytes_up = 0
        self.bytes_down = 0
        self.messages_up = 0
        self.messages_down = 0
        self.drops = RejectLog(log, "MQTT transport")
        self.dropped: Counter[str] = self.drops.counts
        self.presence: dict[str, str] = {}
        self.owns = owns
        self.worker = worker
        self.homed: set[str] = set()  # agents whose own `up` topic this worker subscribed
        self.pinned = False  # True once `pin_clients` replaced the `+/up` wildcard
        # Workers: when each own agent last said `online`, to find agents whose JOIN never
        # reached this worker (`orphans`), and those already asked to join again.
        self._online_since: dict[str, float] = {}
        self.nudged: set[str] = set()
        self.reannounced = 0
        self._homes_lock = threading.Lock()
        # Workers: digests of each agent's last messages. A restarted worker's restored session
        # still holds its agents' own `up` subscriptions beside the join phase's `+/up`, and
        # the broker then delivers their messages twice; every real message is unique.
        self._recent: dict[str, deque[bytes]] = {}
        self.duplicates = 0
        # With a separate fed server: its `sync` messages go here (paho's thread), not inbox.
        self.on_sync: Callable[[bytes], None] | None = None
        name = AGGREGATOR_ID if worker[0] == 0 else f"{AGGREGATOR_ID}-w{worker[0]}"
        online = b"online " + self.instance.encode()
        subs = [self._filter(f"{prefix}/{run_id}/+/{k}") for k in (UP, STATUS)]
        self.link = MqttLink(
            settings,
            f"{prefix}-{run_id}-{name}",
            topic(prefix, run_id, name, STATUS),
            subs,
            self._on_message,
            online_payload=online if owns is None else None,
        )

    def _filter(self, name: str) -> str:
        """`name`, or its shared-subscription form when this transport has a group."""
        return name if self.share is None else f"$share/{self.share}/{name}"

    def announce(self) -> None:
        """Workers: say `online` (rank 0 as the `aggregator`, whose instance agents join)."""
        self.link.announce(b"online " + self.instance.encode())

    def reannounce(self) -> None:
        """Rank 0: say `online` with a new instance id, so that every agent JOINs again.

        For agents whose first JOIN was lost (`orphans`): their home worker subscribed to
        their `up` topic when their `online` status came, and a JOIN sent before that
        subscription took effect reached nobody. The agents ignore a reconnected aggregator
        but JOIN a new instance, and now their home is listening."""
        self.instance = uuid.uuid4().hex[:16]
        self.reannounced += 1
        self.announce()

    def orphans(self, joined: Collection[str], grace: float = 2.0) -> list[str]:
        """Workers: own agents `online` for over `grace` s, homed here, but not in `joined`
        (their JOIN never arrived) and not yet asked to join again."""
        if self.owns is None:
            return []
        now = time.monotonic()
        with self._homes_lock:
            if not self.pinned:
                return []  # the join phase's wildcard still catches every JOIN
            return sorted(
                c for c, t in self._online_since.items()
                if c in self.homed and c not in joined and c not in self.nudged
                and now - t >= grace
            )  # fmt: skip

    def pin_clients(self, known: Sequence[str] = ()) -> None:
        """Workers, after the join phase: subscribe to each own agent's `up` topic (and publish
        its home, retained), then drop the `+/up` wildcard; later agents are homed on their
        first `online` status."""
        with self._homes_lock:
            ids = sorted({*self.presence, *known})
            self.pinned = True
        for cid in ids:
            self._home(cid)
        self.link.unsubscribe(self._filter(f"{self.prefix}/{self.run_id}/+/{UP}"))

    def _duplicate(self, cid: str, payload: bytes) -> bool:
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        recent = self._recent.setdefault(cid, deque(maxlen=32))
        if digest in recent:
            self.duplicates += 1
            return True
        recent.append(digest)
        return False

    def _home(self, cid: str) -> None:
        if self.owns is None or not self.owns(cid) or cid in self.homed:
            return
        self.homed.add(cid)
        self.link.subscribe(self._filter(topic(self.prefix, self.run_id, cid, UP)))
        rank, world = self.worker
        self.link.publish(
            topic(self.prefix, self.run_id, cid, ASSIGN), f"{rank}/{world}".encode(), retain=True
        )

    def start(self, wait: float = 0.0) -> bool:
        self.link.start()
        return self.link.wait_connected(wait) if wait > 0 else self.link.online()

    def _drop(self, reason: str, name: str, detail: str = "") -> None:
        self.drops.reject(reason, detail or reason, name[:120])

    def _on_message(self, name: str, payload: bytes) -> None:
        parsed = parse_topic(self.prefix, self.run_id, name)
        if parsed is None:
            self._drop("foreign_topic", name)
            return
        cid, kind = parsed
        if cid == AGGREGATOR_ID or cid.startswith(f"{AGGREGATOR_ID}-w"):
            return  # our own status, or another worker's
        if cid == FED_SERVER_ID:
            if kind == SYNC and self.on_sync is not None and len(payload) <= self.max_payload:
                self.on_sync(bytes(payload))
            return  # the fed server is no agent
        if self.owns is not None and not self.owns(cid):
            return  # another worker's agent
        if kind == STATUS:
            if not payload:
                return  # a cleared retained status
            presence = parse_presence(payload)
            if presence is None:
                self._drop("bad_status", name)
                return
            state = presence[0]
            with self._homes_lock:
                self.presence[cid] = state
                home = self.pinned and state == "online"
                if state == "online":
                    self._online_since.setdefault(cid, time.monotonic())
                else:
                    self._online_since.pop(cid, None)
            if home:
                self._home(cid)
            with self._offline_lock:
                if state == "offline" and self.presence_grace > 0:
                    # A last will: hold it a moment, as a broker restart fires every will and the
                    # agents are back within seconds, their sessions and messages intact.
                    self._offline.setdefault(cid, time.monotonic() + self.presence_grace)
                    return
                if self._offline.pop(cid, None) is not None and state == "online":
                    log.info(
                        "%s reconnected within %.0f s; kept in the round", cid, self.presence_grace
                    )
            self._put(Incoming(cid, presence=state), name)  # type: ignore[arg-type]
            return
        if kind != UP:
            self._drop("unexpected_kind", name, f"topic kind {kind}")
            return
        if len(payload) > self.max_payload:
            self._drop(
                "oversized", name, f"payload of {len(payload)} bytes over {self.max_payload}"
            )
            return
        if self.owns is not None and self._duplicate(cid, payload):
            return
        self.bytes_up += len(payload)
        self.messages_up += 1
        self._put(Incoming(cid, data=bytes(payload)), name)

    def _put(self, ev: Incoming, name: str) -> None:
        size = len(ev.data) if ev.data is not None else PRESENCE_BYTES
        reason = self.inbox.put(ev.client_id, ev, size)
        if reason is not None:
            self._drop(reason, name, f"{reason}: {size} bytes, inbox holds {self.inbox.bytes}")

    # -- Transport --

    def send(self, client_id: str, data: bytes) -> None:
        self.bytes_down += len(data)
        self.messages_down += 1
        self.link.publish(topic(self.prefix, self.run_id, client_id, DOWN), data)

    def recv(self, timeout: float) -> Incoming | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            now = time.monotonic()
            with self._offline_lock:
                due = [c for c, t in self._offline.items() if t <= now]
                for c in due:
                    del self._offline[c]
                nxt = min(self._offline.values(), default=deadline)
            if due:
                for c in due[1:]:
                    self._put(Incoming(c, presence="offline"), f"{c}/{STATUS}")
                return Incoming(due[0], presence="offline")
            ev = self.inbox.get(max(0.0, min(deadline, nxt) - now))
            if ev is not None:
                return ev
            if time.monotonic() >= deadline:
                return None

    def publish_global(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.messages_down += 1
        self.link.publish(topic(self.prefix, self.run_id, AGGREGATOR_ID, GLOBAL), data, retain=True)

    def close(self) -> None:
        self.link.close()

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())
