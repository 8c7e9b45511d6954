"""`aggregator fed-server`: SplitFed's fed server, the one process that holds the client halves.

In the SplitFed paper the *main server* trains the server half and a separate *fed server*
averages the client halves, so that the main server never sees a device's client-side weights.
Here `aggregator serve --fed-server` is the main server and this module is the fed server:

- each device sends its CLIENT_UPDATE with the client half on `<client>/weights`, which only
  the fed server reads (the shipped Mosquitto ACL denies the main server's user), and a copy
  with the sample counts alone to the main server on `up`;
- at the end of a round the main server sends FED_ROUND (the round's clients in order and
  their sample weights, capped by what it saw them train) on `aggregator/sync`;
- the fed server averages those clients' halves with the strategy's own code
  (`Strategy.average_into`: the same weighting, robust rules and server optimizer as
  `aggregator serve` alone), checkpoints its state atomically, publishes the new global client
  half (retained) on `fed-server/global` and answers FED_PUBLISHED on `fed-server/sync`;
- the main server waits for that answer before it evaluates or starts the next round, and the
  devices wait for the version a round or an evaluation names before they act on it
  (`splitfed.client.ClientRuntime`): evaluation runs through the split path on the devices,
  with the fed server's half, so the main server needs no client weights for it either.

The arithmetic is the one of `aggregator serve` alone, number for number
(tests/mqtt/test_fed_server.py).
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import click
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitfed.algorithms.base import ClientUpdate, Strategy
from splitfed.algorithms.cnn import SplitCNN
from splitfed.checkpoint import load_state, save_checkpoint
from splitfed.client import CLIENT_PREFIX
from splitfed.cliutil import broker_options, broker_overrides, user_errors
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.errors import UserError
from splitfed.metrics import write_json
from splitfed.model import ModelConfig, build_split_model
from splitfed.mqtt import (
    GLOBAL,
    STATUS,
    SYNC,
    WEIGHTS,
    FairInbox,
    LinkSettings,
    MqttLink,
    MqttSettings,
    MqttTransport,
    parse_presence,
    parse_topic,
    topic,
)
from splitfed.server import AGGREGATOR_ID, ServerIO
from splitfed.training import prefixed, state_to_numpy, unprefixed
from splitfed.wire import (
    FED_SERVER_ID,
    ID_PATTERN,
    MAX_COUNT,
    MAX_MESSAGE_BYTES,
    Message,
    MsgType,
    RejectLog,
    Sequencer,
    UpdateBody,
    Validator,
    encode,
    weights_spec,
)
from splitfed.yaml_config import load_yaml_config

log = logging.getLogger("aggregator.fed_server")

# The algorithms whose devices' client halves are averaged every round; the others have none
# to average (sl relays one device's half, fedavg trains the whole model on the devices,
# pyvertical and fedsl have networks of their own, centralized has no devices).
FED_ALGOS = ("sflv1", "sflv2")
MAX_CLIENTS = 10_000  # devices one round may name, and updates held at once
MISSING_WAIT = 30.0  # seconds FED_ROUND waits for a named device's half that has not come
ClientId = Annotated[str, Field(pattern=ID_PATTERN)]


class FedRoundBody(BaseModel):
    """FED_ROUND: what the main server tells the fed server (no weights, no data)."""

    model_config = ConfigDict(extra="forbid")

    phase: Literal["sync", "round"] = Field(
        description="sync: publish your current half; round: average these clients' halves"
    )
    algo: Literal["sflv1", "sflv2"] = Field(description="the run's algorithm")
    seed: int = Field(ge=-(2**62), le=2**62, description="run seed (the initial client half)")
    model: ModelConfig = Field(description="the split network")
    train: TrainConfig = Field(description="training settings")
    aggregation: AggregationConfig = Field(description="how the halves are combined")
    weights_version: int = Field(
        ge=0, le=MAX_COUNT, description="the version the main server is at (sync) or expects"
    )
    clients: list[ClientId] = Field(
        default_factory=list, max_length=MAX_CLIENTS, description="the round's clients, in order"
    )
    weights: list[Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]] = Field(
        default_factory=list, max_length=MAX_CLIENTS, description="their sample weights"
    )

    @model_validator(mode="after")
    def _pairs(self) -> FedRoundBody:
        if len(self.clients) != len(self.weights) or len(set(self.clients)) != len(self.clients):
            raise ValueError("clients and weights do not pair up")
        if {AGGREGATOR_ID, FED_SERVER_ID} & set(self.clients):
            raise ValueError("a server's id among the clients")
        return self


class FedPublishedBody(BaseModel):
    """FED_PUBLISHED: the fed server's answer; its global half is retained on its topic."""

    model_config = ConfigDict(extra="forbid")  # as FED_ROUND: both ends ship together

    phase: Literal["sync", "round"]
    weights_version: int = Field(ge=0, le=MAX_COUNT)
    clients: list[ClientId] = Field(default_factory=list, max_length=MAX_CLIENTS)


# ---- the main server's side ------------------------------------------------------------------


class MainFedLink:
    """The main server's `FedPeer` over its own MQTT connection (`MqttTransport`).

    FED_ROUND goes out on `aggregator/sync`; FED_PUBLISHED comes back on `fed-server/sync`
    (paho's thread puts it in a queue). The main server holds no client half at any time.
    """

    def __init__(self, io: ServerIO, transport: MqttTransport, timeout: float) -> None:
        self.io = io
        self.transport = transport
        self.timeout = timeout
        self.synced: int | None = None  # the fed server's published version we last confirmed
        self.answers: queue.Queue[bytes] = queue.Queue(maxsize=256)
        self.validator = Validator(
            io.run_id,
            {MsgType.FED_PUBLISHED: {}},
            known_sender=lambda src: src == FED_SERVER_ID,
        )
        self.rejects = RejectLog(log, "main server (fed sync)")
        self.sync_topic = topic(transport.prefix, transport.run_id, AGGREGATOR_ID, SYNC)
        transport.on_sync = self._on_sync
        transport.link.subscribe(topic(transport.prefix, transport.run_id, FED_SERVER_ID, SYNC))
        # The devices' updates carry sample counts only: a client half here is refused.
        io.validator.specs[MsgType.CLIENT_UPDATE] = {}

    def _on_sync(self, payload: bytes) -> None:
        try:
            self.answers.put_nowait(payload)
        except queue.Full:
            self.rejects.reject("sync_queue_full", "FED_PUBLISHED queue full", FED_SERVER_ID)

    def _body(self, algo: Strategy, phase: str, version: int, **extra: Any) -> dict[str, Any]:
        assert isinstance(algo, SplitCNN)
        return {
            "phase": phase,
            "algo": algo.name,
            "seed": algo.seed,
            "model": algo.model_cfg.model_dump(mode="json"),
            "train": algo.train_cfg.model_dump(mode="json"),
            "aggregation": algo.aggregation.model_dump(mode="json"),
            "weights_version": version,
            **extra,
        }

    def _ask(self, rnd: int, body: dict[str, Any]) -> FedPublishedBody:
        """Send FED_ROUND and wait for the fed server's answer to this phase and round."""
        msg = self.io.seq.make(MsgType.FED_ROUND, rnd, body)
        deadline = time.monotonic() + self.timeout
        resend = 0.0
        while True:
            now = time.monotonic()
            if now >= resend:  # the fed server may (re)start after us: say it again now and then
                self.transport.link.publish(self.sync_topic, encode(msg))
                msg = self.io.seq.make(MsgType.FED_ROUND, rnd, body)
                resend = now + 5.0
            if now >= deadline:
                raise RuntimeError(
                    f"round {rnd}: no answer from the fed server within {self.timeout:.0f} s "
                    f"(is `aggregator fed-server` running on run {self.io.run_id}?)"
                )
            try:
                raw = self.answers.get(timeout=min(0.5, deadline - now))
            except queue.Empty:
                continue
            got = self.rejects.admit(self.validator, raw, FED_SERVER_ID, FedPublishedBody)
            if got is None:
                continue
            msg, answer = got
            if msg.env.round == rnd and answer.phase == body["phase"]:
                return answer
            # An answer to another question: a late copy of an earlier one (the fed server
            # answers every time it is asked) or one that nobody asked for.
            self.rejects.reject("unasked", f"{answer.phase} of round {msg.env.round}, not "
                                f"{body['phase']} of round {rnd}", FED_SERVER_ID)  # fmt: skip

    def sync(self, algo: Strategy) -> None:
        if self.synced == algo.version:
            return
        rnd = self.io.round
        answer = self._ask(rnd, self._body(algo, "sync", algo.version))
        if answer.weights_version != algo.version:
            raise RuntimeError(
                f"the fed server is at client weights version {answer.weights_version}, this "
                f"main server at {algo.version}: resume both from the same round, or neither"
            )
        self.synced = algo.version
        log.info("fed server holds client weights version %d", algo.version)

    def round_done(self, algo: Strategy, rnd: int, clients: list[str], weights: list[int]) -> None:
        want = algo.version + 1
        body = self._body(algo, "round", want, clients=list(clients), weights=list(weights))
        answer = self._ask(rnd, body)
        if answer.weights_version != want or answer.clients != list(clients):
            raise RuntimeError(
                f"round {rnd}: the fed server averaged {answer.clients} into version "
                f"{answer.weights_version}, this main server expected {list(clients)} into {want}"
            )
        self.synced = want


def attach_fed_server(
    algo: Strategy, io: ServerIO, transport: MqttTransport, timeout: float
) -> MainFedLink:
    """Make `algo` (sflv1, sflv2) leave the client halves to the fed server."""
    if algo.name not in FED_ALGOS:
        raise UserError(
            f"--fed-server: {algo.name} has no client halves to average "
            f"(a fed server serves {', '.join(FED_ALGOS)})"
        )
    if not isinstance(algo, SplitCNN) or algo.ushaped:
        raise UserError("--fed-server and --shape u: the head's average stays with the main server")
    link = MainFedLink(io, transport, timeout)
    algo.fed = link
    return link


def check_fed_serve(cfg: Any, group: Any = None) -> None:
    """`serve --fed-server` with what cannot work without a client half here: one line each."""
    if cfg.algo not in FED_ALGOS:
        raise UserError(
            f"--fed-server: {cfg.algo} has no client halves to average "
            f"(a fed server serves {', '.join(FED_ALGOS)})"
        )
    if cfg.model.shape == "u":
        raise UserError("--fed-server and --shape u: the head's average stays with the main server")
    for flag, value in (("--init-from", cfg.init_from), ("--live", cfg.live_model),
                        ("--eval-data", cfg.eval_data)):  # fmt: skip
        if value:
            raise UserError(f"--fed-server and {flag}: it needs the client half at the main server")
    if group is not None:
        raise UserError("--fed-server runs one main server: not with --workers")


def held_report() -> dict[str, str]:
    """What metrics.json says of who held what in a run with a fed server."""
    return {
        "main_server": "server half (and its per-client copies); the devices' CLIENT_UPDATEs "
        "carry sample counts only, and no client half was received, sent or checkpointed here",
        "fed_server": "client half: the devices' updates, their average (global client "
        "weights, retained on fed-server/global) and its checkpoint",
        "devices": "their data and labels, their client half; evaluation runs on the devices "
        "through the split path with the fed server's client half",
    }


# ---- the fed server --------------------------------------------------------------------------


@dataclass
class _Held:
    """One device's client half of one round, waiting for the round's FED_ROUND."""

    round: int
    update: ClientUpdate


class _Checkpointable:
    """What `save_checkpoint` writes for the fed server: the client half and its state only."""

    def __init__(self, server: FedServer) -> None:
        assert server.algo is not None
        self.s = server
        self.model_cfg = server.algo.model_cfg
        self.name = f"fed-server:{server.algo.name}"

    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        assert self.s.algo is not None
        return prefixed(state_to_numpy(self.s.algo.client_net), "client.")

    def state(self) -> dict[str, Any]:
        a = self.s.algo
        assert a is not None
        return {
            "client": a.client_net.state_dict(),
            "version": a.version,
            "server_opt_state": dict(a.server_opt_state),
            "last_round": self.s.last_round,
            "config": self.s.config_key,
        }


class FedServer:
    """Averages the client halves per round as the main server's FED_ROUND asks.

    Hardened as the aggregator is: payloads over the wire limit are dropped, the inbox is
    bounded per sender and in total, every message is validated (sender on its own topic,
    run, round, replay, tensor names, dtypes and shapes, finite values, body) and every
    rejection is counted by reason.
    """

    def __init__(
        self,
        settings: LinkSettings,
        prefix: str,
        run_id: str,
        checkpoint_dir: Path,
        resume: bool = True,
        exit_when_done: bool = False,
        missing_wait: float = MISSING_WAIT,
        max_payload: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.prefix = prefix
        self.run_id = run_id
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.exit_when_done = exit_when_done
        self.missing_wait = missing_wait
        self.max_payload = max_payload
        self.stop = threading.Event()
        self.algo: SplitCNN | None = None
        self.config_key = ""
        self.last_round = -1
        self.held: dict[str, _Held] = {}
        self.pending: Message | None = None  # a FED_ROUND waiting for devices' halves
        self.pending_deadline = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.rejects = RejectLog(log, "fed server")
        self.bytes_in = 0
        self.bytes_out = 0
        self.seq = Sequencer(FED_SERVER_ID, run_id)
        self.seq.seq = time.time_ns() // 1000  # grows across restarts: peers accept a new one
        self.inbox: FairInbox[tuple[str, str, bytes]] = FairInbox()
        self.main_validator = Validator(
            run_id, {MsgType.FED_ROUND: {}}, known_sender=lambda s: s == AGGREGATOR_ID
        )
        self.device_validator: Validator | None = None  # once the model is known
        self.instance = uuid.uuid4().hex[:16]
        subs = [
            f"{prefix}/{run_id}/+/{WEIGHTS}",
            topic(prefix, run_id, AGGREGATOR_ID, SYNC),
            f"{prefix}/{run_id}/+/{STATUS}",
        ]
        self.link = MqttLink(
            settings,
            f"{prefix}-{run_id}-{FED_SERVER_ID}",
            topic(prefix, run_id, FED_SERVER_ID, STATUS),
            subs,
            self._on_message,
            online_payload=b"online " + self.instance.encode(),
        )

    # -- network thread --

    def _on_message(self, name: str, payload: bytes) -> None:
        parsed = parse_topic(self.prefix, self.run_id, name)
        if parsed is None:
            self.rejects.reject("foreign_topic", "a topic outside the run", name[:120])
            return
        cid, kind = parsed
        if cid == FED_SERVER_ID:
            return  # our own status
        if len(payload) > self.max_payload:
            self.rejects.reject("oversized", f"{len(payload)} bytes", cid)
            return
        reason = self.inbox.put(f"{cid}/{kind}", (cid, kind, bytes(payload)), len(payload))
        if reason is not None:
            self.rejects.reject(reason, f"{len(payload)} bytes on {name[:120]}", cid)

    # -- the loop --

    def run(self) -> None:
        self.link.start()
        while not self.stop.is_set():
            item = self.inbox.get(0.5)
            if item is not None:
                cid, kind, payload = item
                try:
                    self.dispatch(cid, kind, payload)
                except Exception as e:  # noqa: BLE001 - the edge: one message never ends it
                    self.rejects.reject("internal_error", f"{type(e).__name__}: {e}", cid)
            if self.pending is not None:
                self._try_finish()

    def dispatch(self, cid: str, kind: str, payload: bytes) -> None:
        if kind == STATUS:
            self._on_status(cid, payload)
        elif kind == WEIGHTS:
            self._on_weights(cid, payload)
        elif kind == SYNC and cid == AGGREGATOR_ID:
            self._on_sync(payload)
        else:
            self.rejects.reject("unexpected_kind", f"topic kind {kind}", cid)

    def _on_status(self, cid: str, payload: bytes) -> None:
        presence = parse_presence(payload) if payload else None
        if presence is None:
            return
        state = presence[0]
        if cid == AGGREGATOR_ID:
            if state == "stopped" and self.exit_when_done and self.algo is not None:
                log.info("main server stopped")
                self.stop.set()
        elif state == "online" and self.device_validator is not None:
            # A restarted device counts its messages afresh; replays are still caught by id.
            self.device_validator.forget(cid)

    def _on_weights(self, cid: str, payload: bytes) -> None:
        self.bytes_in += len(payload)
        if self.device_validator is None:
            self.rejects.reject("not_configured", "a client half before the first round", cid)
            return
        got = self.rejects.admit(self.device_validator, payload, cid, UpdateBody)
        if got is None:
            return
        msg, body = got
        if cid not in self.held and len(self.held) >= MAX_CLIENTS:
            self.rejects.reject("too_many_clients", f"over {MAX_CLIENTS} held", cid)
            return
        halves = {CLIENT_PREFIX: unprefixed(msg.tensors, CLIENT_PREFIX)}
        self.held[cid] = _Held(msg.env.round, ClientUpdate(halves, body.n_samples, {}))

    def _on_sync(self, payload: bytes) -> None:
        got = self.rejects.admit(self.main_validator, payload, AGGREGATOR_ID, FedRoundBody)
        if got is None:
            return
        msg, body = got
        if not self._configure(body):
            return
        assert self.algo is not None
        if body.phase == "sync":
            self._publish_global()
            self._answer(msg.env.round, "sync", [])
            return
        if msg.env.round <= self.last_round:
            # Our answer was lost or late (the main server says it again): say it again too.
            # (Before the version check: by now we are at the version it asked for.)
            if self.rounds and self.rounds[-1]["round"] == msg.env.round:
                self._answer(msg.env.round, "round", self.rounds[-1]["clients"])
            return
        if body.weights_version != self.algo.version + 1:
            # The main server asks for the version after the one both are at (`round_done`;
            # `sync` made sure they agree, and a resumed fed server is at its checkpoint's by
            # now, as `_configure` ran first). Any other round is not one we can average into:
            # taken in, a far round would move `last_round` past every genuine one.
            self.rejects.reject("wrong_version", f"round {msg.env.round} asks for version "
                                f"{body.weights_version}, the client half is at "
                                f"{self.algo.version}", AGGREGATOR_ID)  # fmt: skip
            return
        if self.pending is not None and self.pending.env.round == msg.env.round:
            return  # said again while we wait for its devices' halves
        self.pending = msg
        self.pending_deadline = time.monotonic() + self.missing_wait
        self._try_finish()

    def _configure(self, body: FedRoundBody) -> bool:
        """Build (or resume) the strategy the main server runs; refuse a changed run."""
        from splitfed.simulate import strategy_class

        key = json.dumps(
            body.model_dump(mode="json", include={"algo", "seed", "model", "aggregation"}),
            sort_keys=True,
        )
        if self.algo is not None:
            if key != self.config_key:
                self.rejects.reject("config_changed", "another run's settings", AGGREGATOR_ID)
                return False
            return True
        algo = strategy_class(body.algo)(body.model, body.train, body.seed, body.aggregation)
        assert isinstance(algo, SplitCNN)
        self.algo, self.config_key = algo, key
        saved = load_state(self.checkpoint_dir) if self.resume else None
        if saved is not None and saved[0].get("config") == key:
            state = saved[0]
            algo.client_net.load_state_dict(state["client"])
            algo.version = int(state["version"])
            algo.server_opt_state = dict(state.get("server_opt_state", {}))
            self.last_round = int(state["last_round"])
            self.rounds = list(saved[1].get("rounds", []))
            log.info("resumed the client half at version %d (round %d) from %s",
                     algo.version, self.last_round + 1, self.checkpoint_dir)  # fmt: skip
        client, _ = build_split_model(body.model, 0)
        spec = weights_spec(state_to_numpy(client), CLIENT_PREFIX)
        self.device_validator = Validator(
            self.run_id,
            {MsgType.CLIENT_UPDATE: spec},
            known_sender=lambda s: s not in (AGGREGATOR_ID, FED_SERVER_ID),
            round_ok=lambda env: env.round > self.last_round,
        )
        log.info("fed server for %s: client half of cut %d, version %d", body.algo,
                 body.model.cut, algo.version)  # fmt: skip
        return True

    def _try_finish(self) -> None:
        msg = self.pending
        assert msg is not None and self.algo is not None
        body = FedRoundBody.model_validate(msg.env.body)
        rnd = msg.env.round
        have = [c for c in body.clients if c in self.held and self.held[c].round == rnd]
        if len(have) < len(body.clients) and time.monotonic() < self.pending_deadline:
            return
        if len(have) < len(body.clients):
            missing = sorted(set(body.clients) - set(have))
            log.warning("round %d: no client half from %s; %s", rnd, missing,
                        "averaging without" if have else "nothing to average")  # fmt: skip
            self.rejects.counts["missing_update"] += len(missing)
        self.pending = None
        algo = self.algo
        if not have:
            # Not one named half came: nothing was averaged, so nothing moves on (neither
            # `last_round` nor the checkpoint, and the halves held stay); a round that did
            # nothing must not make every genuine round after it a "resend".
            # It is still answered, naming nobody at the unchanged version: the main server
            # asks only for rounds with a device in them and takes an answer only if it names
            # them all at its version + 1 (`MainFedLink.round_done`), so a genuine one says
            # so and stops, as it did when this moved `last_round`. Its restart reruns this
            # round from its checkpoint, at this version: still open here, the round's halves
            # are taken again (`round_ok`) and its FED_ROUND is averaged, not answered as done.
            self._answer(rnd, "round", [])
            return
        named = dict(zip(body.clients, body.weights, strict=True))
        # The main server's weights (capped by what it saw trained), never above the claim.
        weights = [min(named[c], self.held[c].update.n_samples) for c in have]
        halves = [self.held[c].update.halves[CLIENT_PREFIX] for c in have]
        algo.average_into(algo.client_net, halves, weights, CLIENT_PREFIX)
        algo.version += 1
        self.last_round = rnd
        self.held = {c: h for c, h in self.held.items() if h.round > rnd}
        self.rounds.append({"round": rnd, "clients": have, "weights_version": algo.version})
        info = {"algo": algo.name, "round": rnd, "rounds": self.rounds, "role": "fed-server"}
        save_checkpoint(self.checkpoint_dir, _Checkpointable(self), info)
        self._publish_global()
        self._answer(rnd, "round", have)
        log.info("round %d: averaged the client halves of %s into version %d", rnd + 1,
                 ", ".join(have), algo.version)  # fmt: skip

    def _publish_global(self) -> None:
        algo = self.algo
        assert algo is not None
        body = {
            "algo": algo.name,
            "mode": "split",
            "seed": algo.seed,
            "model": algo.model_cfg.model_dump(mode="json"),
            "weights_version": algo.version,
        }
        tensors = prefixed(state_to_numpy(algo.client_net), CLIENT_PREFIX)
        data = encode(self.seq.make(MsgType.GLOBAL_WEIGHTS, max(self.last_round, 0), body, tensors))
        self.bytes_out += len(data)
        self.link.publish(topic(self.prefix, self.run_id, FED_SERVER_ID, GLOBAL), data, retain=True)

    def _answer(self, rnd: int, phase: str, clients: list[str]) -> None:
        assert self.algo is not None
        body = {"phase": phase, "weights_version": self.algo.version, "clients": clients}
        data = encode(self.seq.make(MsgType.FED_PUBLISHED, rnd, body))
        self.bytes_out += len(data)
        self.link.publish(topic(self.prefix, self.run_id, FED_SERVER_ID, SYNC), data)

    def close(self) -> None:
        self.link.close()

    def report(self) -> dict[str, Any]:
        return {
            "role": "fed-server",
            "held": held_report(),
            "algo": self.algo.name if self.algo else None,
            "weights_version": self.algo.version if self.algo else None,
            "rounds": self.rounds,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected_messages": self.rejects.total,
            "rejected_by_reason": dict(self.rejects.counts),
        }


# ---- the command -----------------------------------------------------------------------------


@click.command("fed-server")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="mqtt[s]://HOST:PORT of the broker the main server uses")  # fmt: skip
@broker_options("the fed server's", " (the ACL example's: fed-server)")
@click.option(
    "--checkpoint-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("runs/fed-server/checkpoint"),
    show_default=True,
    help="the client half and its state, every round",
)
@click.option("--no-resume", is_flag=True, help="start afresh even if a checkpoint exists")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("runs/fed-server"),
    show_default=True,
    help="fed-server.json: what it held, averaged and rejected",
)
@click.option("--exit-when-done", is_flag=True, help="exit when the main server says `stopped`")
@click.option("--threads", type=int, default=None, help="torch threads [default: torch's]")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def fed_server(**kw: Any) -> None:
    """SplitFed's fed server: average the client halves, so the main server never sees them.

    Run next to `aggregator serve --fed-server` (sflv1, sflv2) on the same broker and run id;
    the algorithm, model and aggregation rule come from the main server's first FED_ROUND."""
    import torch

    from aggregator.options import setup_logging

    setup_logging(kw["verbose"])
    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    mqtt_cfg = load_yaml_config(MqttSettings, None, broker_overrides(kw, under=""))
    settings = mqtt_cfg.link_settings(kw["broker"])
    server = FedServer(
        settings, mqtt_cfg.prefix, mqtt_cfg.run_id, kw["checkpoint_dir"],
        resume=not kw["no_resume"], exit_when_done=kw["exit_when_done"],
    )  # fmt: skip
    _on_term(server.stop.set)
    log.info("fed server on %s (run %s): waiting for the main server", kw["broker"],
             mqtt_cfg.run_id)  # fmt: skip
    try:
        server.run()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.close()
        kw["out"].mkdir(parents=True, exist_ok=True)
        write_json(kw["out"] / "fed-server.json", server.report())
    click.echo(f"wrote {kw['out']}/fed-server.json; checkpoints in {kw['checkpoint_dir']}")


def _on_term(stop: Callable[[], None]) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda _s, _f: stop())
