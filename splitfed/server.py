"""The aggregator's side of the protocol: who is in the federation, and checked messages.

`ServerIO` wraps a `Transport` with the run's validator and sequencer. Algorithms ask it for
the next valid message; anything malformed, replayed, late or from a stranger is dropped here
with a logged reason and counted, so the round logic only ever sees well-formed input. This is
the aggregator's edge: no exception raised while checking a message gets past `_accept`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitfed.client import CLIENT_PREFIX, HEAD_PREFIX, SERVER_PREFIX
from splitfed.config import TrainConfig
from splitfed.model import ModelConfig, build_split_model, feature_dim, smashed_shape
from splitfed.training import state_to_numpy
from splitfed.transport import Incoming, Transport
from splitfed.wire import (
    Envelope,
    JoinBody,
    Message,
    MsgType,
    RejectLog,
    Sequencer,
    ShapeSpec,
    Validator,
    WireError,
    activation_spec,
    check_body,
    encode,
    weights_spec,
)

log = logging.getLogger(__name__)

AGGREGATOR_ID = "aggregator"


@dataclass
class ClientInfo:
    client_id: str
    n_train: int
    n_test: int
    class_counts: list[int]
    online: bool = True
    joined_at: float = field(default_factory=time.time)


@dataclass
class Presence:
    client_id: str
    state: str


class ServerIO:
    """Checked, counted messaging for one run on the aggregator."""

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        max_batch: int = 1024,
    ) -> None:
        self.transport = transport
        self.run_id = run_id
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.seq = Sequencer(AGGREGATOR_ID, run_id)
        self.clients: dict[str, ClientInfo] = {}
        self.round = 0
        self.rejects = RejectLog(log, "aggregator")
        self.rejected: Counter[str] = self.rejects.counts  # by reason; metrics report it
        # U-shape: per client, the FEATURES message its next FEATURE_GRADS must answer.
        self._features_sent: dict[str, str] = {}
        client, server = build_split_model(model_cfg, 0)
        act = activation_spec(train_cfg.compression, smashed_shape(model_cfg))
        c_spec = weights_spec(state_to_numpy(client), CLIENT_PREFIX)
        s_spec = weights_spec(state_to_numpy(server), SERVER_PREFIX)
        # U-shape: the device's head travels with its half, its labels stay home.
        u = model_cfg.shape == "u"
        labels = {} if u else {"labels": (frozenset({"I64"}), (-1,))}
        if u:
            c_spec.update(weights_spec(state_to_numpy(server.fc), HEAD_PREFIX))

        def update_spec(env: Envelope) -> ShapeSpec:
            return {**c_spec, **s_spec} if env.body.get("full") else c_spec

        specs: dict[MsgType, Any] = {
            MsgType.JOIN: {},
            MsgType.LEAVE: {},
            MsgType.SMASHED: {**act, **labels},
            MsgType.CLIENT_UPDATE: update_spec,
            MsgType.EVAL_SMASHED: act,
            MsgType.EVAL_RESULT: {},
            MsgType.PREDICT: act,
        }
        if u:
            grad = (frozenset({"F32", "F16"}), (-1, feature_dim(model_cfg)))
            specs[MsgType.FEATURE_GRADS] = {"grad": grad}
        self.validator = Validator(
            run_id, specs, known_sender=self._known, round_ok=self._round_ok, max_batch=max_batch
        )

    def _known(self, src: str) -> bool:
        return src in self.clients

    def _round_ok(self, env: Envelope) -> bool:
        if env.type in (MsgType.JOIN, MsgType.LEAVE, MsgType.PREDICT):
            return True
        return env.round == self.round

    # ---- sending ------------------------------------------------------------------------------

    def send(
        self,
        client_id: str,
        type: MsgType,
        body: Mapping[str, Any] | None = None,
        tensors: Mapping[str, np.ndarray] | None = None,
        reply_to: str = "",
        round: int | None = None,
    ) -> None:
        msg = self.seq.make(type, self.round if round is None else round, body, tensors, reply_to)
        if type is MsgType.FEATURES and "step" in msg.env.body:  # a training batch's features
            self._features_sent[client_id] = msg.env.message_id
        self.transport.send(client_id, encode(msg))

    def publish_global(self, body: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
        msg = self.seq.make(MsgType.GLOBAL_WEIGHTS, self.round, body, tensors)
        self.transport.publish_global(encode(msg))

    # ---- receiving ----------------------------------------------------------------------------

    def next(self, deadline: float) -> Message | Presence | None:
        """The next valid message or presence change before `deadline` (time.monotonic())."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ev = self.transport.recv(remaining)
            if ev is None:
                return None
            out = self._accept(ev)
            if out is not None:
                return out

    def _accept(self, ev: Incoming) -> Message | Presence | None:
        if ev.presence is not None:
            info = self.clients.get(ev.client_id)
            if info is not None:
                info.online = ev.presence == "online"
            return Presence(ev.client_id, ev.presence)
        if ev.data is None:
            self.rejects.reject(
                "empty_event", "an event with neither data nor presence", ev.client_id
            )
            return None
        try:
            msg = self.validator.check(ev.data, sender=ev.client_id)
            body = check_body(msg)
            if isinstance(body, JoinBody) and body.client_id != msg.src:
                raise WireError(f"{msg.src!r} joined as {body.client_id!r}", "spoofed_sender")
            if msg.type is MsgType.FEATURE_GRADS:
                # Only an answer to the features of this client's batch in flight: one that
                # answers nothing (no round running, another step, a forged reply) is refused.
                if self._features_sent.get(msg.src) != msg.env.reply_to:
                    raise WireError(f"feature gradients that answer no features sent to "
                                    f"{msg.src!r}", "unasked")  # fmt: skip
                del self._features_sent[msg.src]
            # The round logic reads the body: give it the checked, typed values.
            msg.env.body = {**msg.env.body, **body.model_dump()}
            if isinstance(body, JoinBody):
                self._register(body)
            elif msg.type is MsgType.LEAVE and msg.src in self.clients:
                self.clients[msg.src].online = False
        except WireError as e:
            self.rejects.reject(e.reason, str(e), ev.client_id)
            return None
        except Exception as e:  # noqa: BLE001 - the edge: a peer's message never ends the run
            self.rejects.reject("internal_error", f"{type(e).__name__}: {e}", ev.client_id)
            return None
        return msg

    def _register(self, body: JoinBody) -> None:
        if tuple(body.input_shape) != tuple(self.model_cfg.input_shape):
            log.warning(
                "client %s crops are %s, the model expects %s; ignored",
                body.client_id,
                body.input_shape,
                self.model_cfg.input_shape,
            )
            return
        old = self.clients.get(body.client_id)
        self.clients[body.client_id] = ClientInfo(
            body.client_id, body.n_train, body.n_test, body.class_counts
        )
        if old is not None:
            log.info("client %s re-joined", body.client_id)
        else:
            log.info("client %s joined with %d training samples", body.client_id, body.n_train)

    def wait_for_clients(self, n: int, timeout: float) -> list[str]:
        """Block until `n` clients are online; messages that are not JOINs are set aside."""
        deadline = time.monotonic() + timeout
        while sum(c.online for c in self.clients.values()) < n:
            ev = self.next(deadline)
            if ev is None and time.monotonic() >= deadline:
                break
        return self.online()

    def online(self) -> list[str]:
        return sorted(c for c, info in self.clients.items() if info.online)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())
