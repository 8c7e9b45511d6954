"""The device's side of the federation over MQTT: a device runtime behind one MQTT connection.

Every wire message from the aggregator goes to the runtime's `handle_bytes`, and its replies are
published on this device's `up` topic: the same runtime the simulator drives (`ClientRuntime`
for the split CNN and FedAvg, `OwnerRuntime` for a PyVertical data owner, `SegmentRuntime` for
a FedSL segment), so an agent with `--shard I/N` computes what simulated client I computes.
The agent joins each aggregator instance once (a restarted aggregator gets a fresh JOIN, and
its rounds are taken from wherever its checkpoint resumes them; a reconnected one does not),
loads pushed global weights without a restart, and turns live frames' smashed data into
PREDICT messages whose PREDICTION answers it prints and republishes as JSON (the split-CNN
client only: the other runtimes hold no client half of a whole crop).

A live frame leaves as the run's defence allows (`ClientRuntime.live_wire`: the same
`splitfed.defences.to_wire` as training, noise keyed by the device's secret, the run's
compression), whichever half computed it (torch or ONNX). In a U-shaped run the aggregator
answers a PREDICT with the server half's features, and the device's own head finishes the
prediction: no logit of a live frame crosses the wire either.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from splitfed.client import ClientRuntime
from splitfed.device import DeviceRuntime
from splitfed.emotions import EMOTIONS, NUM_CLASSES
from splitfed.model import ClientNet
from splitfed.mqtt import (
    DOWN,
    GLOBAL,
    INBOX_BYTES,
    PREDICTION,
    STATUS,
    WEIGHTS,
    FairInbox,
    LinkSettings,
    MqttLink,
    parse_presence,
    parse_topic,
    topic,
)
from splitfed.server import AGGREGATOR_ID
from splitfed.training import softmax
from splitfed.wire import (
    FED_SERVER_ID,
    Envelope,
    MsgType,
    RejectLog,
    ShapeSpec,
    Validator,
    WireError,
    encode,
    read_header,
)

log = logging.getLogger(__name__)

# The aggregator instance an agent assumes when the aggregator talks to it before its status
# came (a new process on the session of one that died): it has joined already.
RESTORED_SESSION = "restored-session"


@dataclass
class Prediction:
    """One live frame's answer, as printed and published on `<client>/prediction`."""

    frame: int
    emotion: str
    confidence: float
    probs: list[float]
    latency_ms: float
    weights_version: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "frame": self.frame,
                "emotion": self.emotion,
                "confidence": round(self.confidence, 4),
                "probs": {e: round(p, 4) for e, p in zip(EMOTIONS, self.probs)},
                "latency_ms": round(self.latency_ms, 2),
                "weights_version": self.weights_version,
                "ts": time.time(),
            }
        ).encode()


class Agent:
    """Runs a device runtime over MQTT; `run()` processes messages until `stop` is set."""

    def __init__(
        self,
        runtime: DeviceRuntime,
        settings: LinkSettings,
        prefix: str,
        run_id: str,
        stop: threading.Event | None = None,
        exit_when_done: bool = False,
        predict_ttl: float = 5.0,
        on_prediction: Callable[[Prediction], None] | None = None,
        inbox_size: int = 4096,
        inbox_bytes: int = INBOX_BYTES,
    ) -> None:
        self.runtime = runtime
        self.client_id = runtime.client_id
        self.prefix = prefix
        self.run_id = run_id
        self.stop = stop or threading.Event()
        self.exit_when_done = exit_when_done
        self.predict_ttl = predict_ttl
        self.on_prediction = on_prediction
        # One queue per topic, served in turn and bounded in bytes: a flood on one topic (say
        # junk on `down`) neither exhausts memory nor holds back the aggregator's status.
        self.inbox: FairInbox[tuple[str, str, bytes, float]] = FairInbox(
            inbox_size, inbox_bytes, inbox_size // 2, inbox_bytes // 2
        )
        self.lock = threading.RLock()  # one sender sequence: runtime replies and live frames
        self.counters: Counter[str] = Counter()
        self.rejects = RejectLog(log, f"agent {runtime.client_id}")  # what it refused, by reason
        self.aggregator_instance: str | None = None
        self.aggregator_state = "unknown"
        self.joined = threading.Event()
        self.smashed_sent: dict[str, float] = {}
        self.grad_latency: deque[float] = deque(maxlen=100_000)
        self.predict_sent: dict[str, tuple[int, float]] = {}
        self.predict_latency: deque[float] = deque(maxlen=10_000)
        self.live_net: ClientNet | None = None
        self.live_head: torch.nn.Module | None = None  # U-shape: the device's classifier head
        self.live_version = -1
        # Called with (client half snapshot, version) when new global weights arrive, e.g. to
        # re-quantize the ONNX model; runs on the message loop, so it must hand work off.
        self.on_weights: Callable[[ClientNet, int], None] | None = None
        # The answers to live frames: PREDICTION, or (U-shape) the server half's FEATURES.
        self._pred_validator = Validator(
            run_id,
            {
                MsgType.PREDICTION: {"probs": (frozenset({"F32"}), (-1, NUM_CLASSES))},
                MsgType.FEATURES: self._live_features_spec,
            },
            known_sender=lambda src: src == AGGREGATOR_ID,
        )
        subs = [
            topic(prefix, run_id, self.client_id, DOWN),
            topic(prefix, run_id, AGGREGATOR_ID, STATUS),
            topic(prefix, run_id, AGGREGATOR_ID, GLOBAL),
            topic(prefix, run_id, FED_SERVER_ID, GLOBAL),  # with a separate fed server
        ]
        self.up_topic = topic(prefix, run_id, self.client_id, "up")
        self.weights_topic = topic(prefix, run_id, self.client_id, WEIGHTS)
        self.prediction_topic = topic(prefix, run_id, self.client_id, PREDICTION)
        self.link = MqttLink(
            settings,
            f"{prefix}-{run_id}-{self.client_id}",
            topic(prefix, run_id, self.client_id, STATUS),
            subs,
            self._on_message,
            # A restarted agent on its old session learns the aggregator's instance, and JOINs.
            always_retained=[topic(prefix, run_id, AGGREGATOR_ID, STATUS)],
        )

    # ---- network thread ------------------------------------------------------------------------

    def _on_message(self, name: str, payload: bytes) -> None:
        parsed = parse_topic(self.prefix, self.run_id, name)
        if parsed is None:
            self.counters["foreign_topic"] += 1
            return
        item = (parsed[0], parsed[1], bytes(payload), time.perf_counter())
        reason = self.inbox.put(f"{parsed[0]}/{parsed[1]}", item, len(payload))
        if reason is not None:
            self._reject(reason, f"{len(payload)} bytes on {name[:120]}")

    def _reject(self, reason: str, detail: str) -> None:
        self.counters["rejected"] += 1
        self.rejects.reject(reason, detail, "the network")

    # ---- main loop -----------------------------------------------------------------------------

    def start(self) -> None:
        self.link.start()

    def run(self, watchdog: Any = None) -> None:
        """Handle messages until `stop` (or the aggregator's `stopped` with exit_when_done).

        `watchdog` (splitfed.sdnotify.Watchdog) is pinged from this loop: a hung loop stops
        the pings and systemd restarts the agent.
        """
        while not self.stop.is_set():
            if watchdog is not None:
                watchdog.ping()
            item = self.inbox.get(0.2)
            if item is None:
                continue
            cid, kind, payload, received = item
            try:
                self.dispatch(cid, kind, payload, received)
            except Exception:  # one bad message must not end the agent
                self.counters["errors"] += 1
                log.exception("agent %s: failed to handle a %s message", self.client_id, kind)

    def dispatch(self, cid: str, kind: str, payload: bytes, received: float | None = None) -> None:
        """Act on one received message; whatever goes wrong is a rejection with a reason."""
        try:
            self._dispatch(cid, kind, payload, received)
        except WireError as e:
            self._reject(e.reason, str(e))
        except Exception as e:  # noqa: BLE001 - the agent's edge: one message never ends it
            self._reject("handler_error", f"{kind} message: {type(e).__name__}: {e}")

    def _dispatch(self, cid: str, kind: str, payload: bytes, received: float | None) -> None:
        if cid == AGGREGATOR_ID and kind == STATUS:
            self._on_aggregator_status(payload)
            return
        if kind not in (DOWN, GLOBAL) or (kind == DOWN and cid != self.client_id):
            return
        if kind == DOWN and self.aggregator_instance is None:
            # A new process on the session of one that died: the broker restored the
            # subscriptions, so the retained `online` never came, but the aggregator is
            # talking to this id. Announce this (stateless) device, or it never trains again.
            log.info("messages from the aggregator before its status: joining")
            self.aggregator_instance = RESTORED_SESSION
            self.join()
        self.counters["received"] += 1
        env, _ = read_header(payload)  # a WireError is counted by dispatch
        if env.type is MsgType.PREDICTION or (env.type is MsgType.FEATURES and "frame" in env.body):
            self._on_prediction(payload)
            return
        now = time.perf_counter() if received is None else received
        with self.lock:
            rejected = self.runtime.rejected
            replies = self.runtime.handle_bytes(payload)
            if self.runtime.rejected > rejected:
                self.counters["rejected"] += 1
            elif env.type is MsgType.GRADIENTS:
                sent = self.smashed_sent.pop(env.reply_to, None)
                if sent is not None:
                    self.grad_latency.append(now - sent)
            for reply in replies:
                self._publish_up(reply)
        if env.type in (MsgType.GLOBAL_WEIGHTS, MsgType.EVAL_REQUEST):
            # Not on ROUND_START: its first training forward pass already moved BatchNorm stats.
            self._refresh_live_net()

    def _publish_up(self, data: bytes) -> None:
        env, specs = read_header(data)
        if env.type is MsgType.SMASHED:
            self.smashed_sent[env.message_id] = time.perf_counter()
        self.counters["sent"] += 1
        self.counters[f"sent_{env.type.value}"] += 1
        if env.type is MsgType.CLIENT_UPDATE and specs and getattr(self.runtime, "fed_server", 0):
            # The client half goes to the fed server's topic alone: the aggregator (and the
            # ACL keeps it so) never reads it. The aggregator gets the counts on `up`.
            self.link.publish(self.weights_topic, data)
            return
        self.link.publish(self.up_topic, data)

    def _on_aggregator_status(self, payload: bytes) -> None:
        presence = parse_presence(payload) if payload else None
        if presence is None:
            return
        state, instance = presence
        self.aggregator_state = state
        if state == "online" and instance != self.aggregator_instance:
            # A new aggregator (first contact, or a restart): announce this device, unless it
            # did already, on the aggregator's first message to a restored session.
            restored = self.aggregator_instance == RESTORED_SESSION
            self.aggregator_instance = instance
            if not restored:
                with self.lock:
                    self.runtime.new_aggregator()
                self.join()
        elif state == "stopped":
            log.info("aggregator stopped")
            if self.exit_when_done and self.joined.is_set():
                self.stop.set()
        elif state == "offline":
            log.warning("aggregator went offline; waiting for it to come back")

    def join(self) -> None:
        with self.lock:
            data = self.runtime.join()
            self.link.publish(self.up_topic, data)
            self.counters["joins"] += 1
        self.joined.set()
        body = read_header(data)[0].body  # what this device announced, whatever its role
        log.info(
            "%s joined the run %s as %s (%d training records)",
            self.client_id,
            self.run_id,
            body.get("role", "client"),
            body.get("n_train", 0),
        )

    def close(self, reason: str = "stopped") -> None:
        """LEAVE, then `stopped` on the status topic and a clean disconnect (no last will)."""
        if self.link.online() and self.joined.is_set():
            with self.lock:
                self.link.publish(self.up_topic, self.runtime.leave(reason))
        self.link.close()

    # ---- live frames ---------------------------------------------------------------------------

    def _refresh_live_net(self) -> None:
        """Copy the client half after new weights arrive, for the live pipeline's own use."""
        if not isinstance(self.runtime, ClientRuntime):
            return  # owners and segments hold no client half of whole crops
        with self.lock:
            net = self.runtime.client_net
            version = self.runtime.weights_version
            if net is None or version == self.live_version:
                return
            snapshot = copy.deepcopy(net).eval()
            server = self.runtime.server_net
            head = copy.deepcopy(server.fc).eval() if self.runtime.ushaped and server else None
        self.live_net, self.live_head, self.live_version = snapshot, head, version
        log.info("client half for live frames: global weights version %d", version)
        if self.on_weights is not None:
            self.on_weights(snapshot, version)

    def live_ready(self) -> bool:
        """Joined, and told by the aggregator how smashed data leaves this run (its defence):
        before that a live frame could only leave undefended, so none leaves. U-shape: and
        holding the head that finishes the prediction."""
        runtime = self.runtime
        return (
            self.joined.is_set()
            and isinstance(runtime, ClientRuntime)
            and runtime.live_configured()
            and (not runtime.ushaped or self.live_head is not None)
        )

    def send_predict(self, frame: int, activations: np.ndarray, captured_at: float) -> bool:
        """Publish one frame's smashed data, defended as the run's training batches are; the
        aggregator answers with its emotion (U-shape: with the features for the device's head).
        """
        if not self.live_ready():
            self.counters["predict_not_ready"] += 1
            return False
        assert isinstance(self.runtime, ClientRuntime)
        with self.lock:
            tensors = self.runtime.live_wire(activations)
            msg = self.runtime.seq.make(
                MsgType.PREDICT, 0, {"frame": frame}, tensors, ttl=self.predict_ttl
            )
            self.predict_sent[msg.env.message_id] = (frame, captured_at)
            if len(self.predict_sent) > 1000:  # answers that never came
                self.predict_sent.pop(next(iter(self.predict_sent)))
            ok = self.link.publish(self.up_topic, encode(msg))
        self.counters["predict_sent"] += 1
        return ok

    def local_prediction(self, frame: int, logits: np.ndarray, captured_at: float) -> bool:
        """Offline mode: the full model ran on the device; reported as an aggregator answer."""
        p = softmax(logits.reshape(-1)[:NUM_CLASSES])
        self._report(frame, p, time.perf_counter() - captured_at)
        return True

    def _report(self, frame: int, p: np.ndarray, latency: float) -> None:
        self.predict_latency.append(latency)
        k = int(np.argmax(p))
        pred = Prediction(
            frame, EMOTIONS[k], float(p[k]), p.tolist(), latency * 1e3, self.live_version
        )
        self.counters["predictions"] += 1
        self.link.publish(self.prediction_topic, pred.to_json(), qos=0)
        if self.on_prediction is not None:
            self.on_prediction(pred)

    def _live_features_spec(self, env: Envelope) -> ShapeSpec:
        runtime = self.runtime
        if not isinstance(runtime, ClientRuntime):
            raise ValueError("features for a live frame on a device without a client half")
        return runtime.live_features_spec()

    def _on_prediction(self, payload: bytes) -> None:
        try:
            msg = self._pred_validator.check(payload)
            frame = int(msg.env.body["frame"])
        except WireError as e:
            self._reject(e.reason, f"prediction: {e}")
            return
        except (KeyError, TypeError, ValueError) as e:
            self._reject("bad_body", f"prediction: {type(e).__name__}: {e}")
            return
        sent = self.predict_sent.pop(msg.env.reply_to, None)
        probs: np.ndarray | None = None
        if sent is not None:  # U-shape: the features of the frame, for this device's head
            probs = (self._head_probs(msg.tensors["features"]) if msg.type is MsgType.FEATURES
                     else msg.tensors["probs"])  # fmt: skip
        if sent is None or probs is None or len(probs) != 1:
            self.counters["unmatched_prediction"] += 1
            return
        self._report(frame, probs[0].astype(float), time.perf_counter() - sent[1])

    def _head_probs(self, features: np.ndarray) -> np.ndarray | None:
        """U-shape: the device's own head finishes a live frame's prediction."""
        head = self.live_head
        if head is None:
            return None
        with torch.no_grad():
            logits = head(torch.from_numpy(features.astype(np.float32)))
            return torch.softmax(logits, 1).numpy()

    # ---- numbers -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        def pct(values: deque[float], q: float) -> float | None:
            return float(np.percentile(np.asarray(values), q) * 1e3) if values else None

        return {
            "client_id": self.client_id,
            "counters": dict(self.counters),
            "runtime_rejected": self.runtime.rejected,
            "rejected_by_reason": dict(self.rejects.counts + self.runtime.rejected_by_reason),
            "grad_latency_ms": {
                "n": len(self.grad_latency),
                "p50": pct(self.grad_latency, 50),
                "p99": pct(self.grad_latency, 99),
            },
            "predict_latency_ms": {
                "n": len(self.predict_latency),
                "p50": pct(self.predict_latency, 50),
                "p99": pct(self.predict_latency, 99),
            },
            "mqtt": {
                "connects": self.link.connects,
                "disconnects": self.link.disconnects,
                "publish_failures": self.link.publish_failures,
            },
            "grad_latencies_ms": [x * 1e3 for x in self.grad_latency],
        }
