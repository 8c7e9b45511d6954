"""Hostile FED_ROUND and FED_PUBLISHED (tests/mqtt/hostile/) to their receivers, in-process.

Each class of `FED_SERVER_CLASSES` goes through the fed server's receive path (`_on_message`,
its inbox, `dispatch`: what its network thread and loop do), each of `MAIN_FED_CLASSES`
through the main server's (`MainFedLink`: the queue paho's thread fills, and `round_done`),
without a broker. Every message is refused and counted once, under its class's reasons;
nothing raises, nothing is averaged, answered or moved on, and the genuine round that follows
goes through as if nothing had come before it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel, model_validator

from aggregator.fed_server import FedServer, MainFedLink, attach_fed_server
from splitfed.algorithms.sflv1 import SFLV1
from splitfed.checkpoint import load_state
from splitfed.client import CLIENT_PREFIX
from splitfed.config import TrainConfig
from splitfed.model import ModelConfig, build_split_model
from splitfed.mqtt import LinkSettings
from splitfed.server import AGGREGATOR_ID, ServerIO
from splitfed.training import prefixed, state_to_numpy
from splitfed.wire import (
    FED_SERVER_ID,
    Message,
    MsgType,
    RejectLog,
    Sequencer,
    Validator,
    decode,
    encode,
    weights_spec,
)

from .hostile import FED_SERVER_CLASSES, MAIN_FED_CLASSES, HostileClass, Target

PREFIX, RUN = "splitfed", "fz"
MODEL = ModelConfig(widths=(8, 16, 16), cut=1)
TRAIN = TrainConfig(batch_size=16)
ROUND, VERSION = 3, 3  # the main server asks round 3 to make client weights version 3
CLIENTS, WEIGHTS, SAMPLES = ["client-00", "client-01"], [30, 10], [30, 50]
PER_CLASS = 60


def main_link() -> tuple[MainFedLink, SFLV1, list[Message]]:
    """The main server's side at round ROUND (client weights at VERSION - 1), on no broker:
    what it publishes is kept in the list."""
    published: list[Message] = []

    def publish(_topic: str, data: bytes, **_: Any) -> None:
        published.append(decode(data))

    mqtt = SimpleNamespace(subscribe=lambda *_: None, publish=publish)
    transport: Any = SimpleNamespace(prefix=PREFIX, run_id=RUN, on_sync=None, link=mqtt)
    io = ServerIO(transport, RUN, MODEL, TRAIN)
    io.seq.seq = time.time_ns() // 1000  # as `aggregator serve` starts it
    io.round = ROUND
    algo = SFLV1(MODEL, TRAIN, 0)
    algo.version = VERSION - 1
    return attach_fed_server(algo, io, transport, timeout=10.0), algo, published


def target() -> Target:
    """The run as the hostile classes see it, with the FED_ROUND body the main server sends."""
    fed, algo, _ = main_link()
    client, _ = build_split_model(MODEL, 0)
    spec = weights_spec(state_to_numpy(client), CLIENT_PREFIX)
    weights = {k: (next(iter(dtypes)), shape) for k, (dtypes, shape) in spec.items()}
    body = fed._body(algo, "round", VERSION, clients=CLIENTS, weights=WEIGHTS)
    return Target(RUN, PREFIX, (), tuple(MODEL.input_shape), weights, 0, ROUND, body)


def check_refused(cls: HostileClass, counts: dict[str, int], sent: int) -> None:
    """Each message counted once, and under its class's reasons: every one of them, no other."""
    assert sum(counts.values()) == sent, counts
    assert set(counts) == cls.reasons, (sorted(counts), sorted(cls.reasons))


# ---- the fed server --------------------------------------------------------------------------


def deliver(server: FedServer, name: str, payload: bytes) -> None:
    """One message as the broker hands it over, then the server's loop, until the inbox is empty
    (no catch-all around `dispatch`: whatever it raises fails the test)."""
    server._on_message(name, payload)
    while (item := server.inbox.get(0)) is not None:
        server.dispatch(*item)


def _update(cid: str, seed: int, n: int) -> bytes:
    client, _ = build_split_model(MODEL, seed)
    body = {"n_samples": n, "steps": 1, "seen": n}
    tensors = prefixed(state_to_numpy(client), CLIENT_PREFIX)
    return encode(Sequencer(cid, RUN).make(MsgType.CLIENT_UPDATE, ROUND, body, tensors))


@pytest.mark.parametrize("name", sorted(FED_SERVER_CLASSES))
def test_fed_server_refuses_hostile_fed_rounds(name: str, tmp_path: Path) -> None:
    cls, t = FED_SERVER_CLASSES[name], target()
    batch = cls.make(t, np.random.default_rng(0), PER_CLASS)
    server = FedServer(LinkSettings(port=9), PREFIX, RUN, tmp_path / "ckpt", missing_wait=0.0)
    published: list[tuple[str, Message]] = []

    def publish(topic: str, data: bytes, **_: Any) -> None:
        published.append((topic, decode(data)))

    server.link = SimpleNamespace(publish=publish)  # never started: what it sends is kept
    for topic, payload in batch.setup:  # the main server's sync: it configures the fed server
        deliver(server, topic, payload)
    assert server.algo is not None and server.rejects.total == 0, server.rejects.counts
    server.algo.version, server.last_round = VERSION - 1, ROUND - 1  # as in the middle of a run
    answers = len(published)

    assert len(batch.hostile) == PER_CLASS
    for i, (topic, payload) in enumerate(batch.hostile):
        before = server.rejects.total
        deliver(server, topic, payload)
        assert server.rejects.total == before + 1, (i, topic, dict(server.rejects.counts))
    check_refused(cls, dict(server.rejects.counts), len(batch.hostile))
    # Nothing taken in: no round waits, no half is held, nothing was averaged or answered.
    assert server.pending is None and not server.held and len(published) == answers
    assert server.algo.version == VERSION - 1 and server.last_round == ROUND - 1

    # The genuine round: both devices' halves, then the main server's FED_ROUND.
    refused = server.rejects.total
    for i, cid in enumerate(CLIENTS):
        deliver(server, t.weights_topic(cid), _update(cid, i + 1, SAMPLES[i]))
    main = Sequencer(AGGREGATOR_ID, RUN)
    main.seq = time.time_ns() // 1000
    deliver(server, t.sync(AGGREGATOR_ID), encode(main.make(MsgType.FED_ROUND, ROUND, t.fed_body)))
    assert server.rejects.total == refused, server.rejects.counts
    assert server.algo.version == VERSION and server.last_round == ROUND
    topic, answer = published[-1]
    assert topic == t.sync(FED_SERVER_ID) and answer.type is MsgType.FED_PUBLISHED
    assert answer.env.round == ROUND
    assert answer.env.body == {"phase": "round", "weights_version": VERSION, "clients": CLIENTS}


# ---- the main server -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MAIN_FED_CLASSES))
def test_main_server_refuses_hostile_fed_answers(name: str) -> None:
    cls, t = MAIN_FED_CLASSES[name], target()
    batch = cls.make(t, np.random.default_rng(0), PER_CLASS)
    assert not batch.setup and len(batch.hostile) == PER_CLASS
    assert {topic for topic, _ in batch.hostile} == {t.sync(FED_SERVER_ID)}
    link, algo, published = main_link()
    assert link.transport.on_sync is not None
    for _, payload in batch.hostile:  # all of them before the answer, as paho's thread queues
        link.transport.on_sync(payload)
    fed = Sequencer(FED_SERVER_ID, RUN)
    fed.seq = time.time_ns() // 1000  # as `aggregator fed-server` starts it
    answer = {"phase": "round", "weights_version": VERSION, "clients": CLIENTS}
    link.transport.on_sync(encode(fed.make(MsgType.FED_PUBLISHED, ROUND, answer)))

    # It asks, refuses every hostile answer, and takes the genuine one (a hostile one taken
    # would raise here, for its version or clients, or leave it waiting until its timeout).
    link.round_done(algo, ROUND, CLIENTS, WEIGHTS)
    assert link.synced == VERSION and link.answers.empty()
    check_refused(cls, dict(link.rejects.counts), len(batch.hostile))
    asked = published[0]
    assert asked.type is MsgType.FED_ROUND and asked.env.round == ROUND
    assert asked.env.body["clients"] == CLIENTS and asked.env.body["weights"] == WEIGHTS


# ---- the edge both use -----------------------------------------------------------------------


class _Touchy(BaseModel):
    n: int

    @model_validator(mode="after")
    def _check(self) -> _Touchy:
        if self.n == 13:
            raise RuntimeError("a bug that a body can reach")  # pydantic lets it through
        return self


def test_admit_counts_every_way_a_message_fails() -> None:
    rejects = RejectLog(logging.getLogger("test"), "test")
    validator = Validator(RUN, {MsgType.FED_PUBLISHED: {}})
    seq = Sequencer(FED_SERVER_ID, RUN)

    def admit(n: Any, src: str = FED_SERVER_ID) -> tuple[Message, _Touchy] | None:
        data = encode(seq.make(MsgType.FED_PUBLISHED, 0, {"n": n}))
        return rejects.admit(validator, data, src, _Touchy)

    got = admit(1)
    assert got is not None and got[1].n == 1 and got[0].type is MsgType.FED_PUBLISHED
    assert admit(2, src="client-00") is None  # the validator's WireError: its reason
    assert admit("x") is None  # the body's ValidationError: bad_body
    assert admit(13) is None  # anything else: internal_error, and nothing raised
    assert rejects.admit(validator, b"\0" * 3, FED_SERVER_ID, _Touchy) is None
    assert rejects.counts == {"spoofed_sender": 1, "bad_body": 1, "internal_error": 1, "short": 1}


# ---- the round's version and a round that averaged nobody ------------------------------------

FAR = 10**6  # the furthest round an envelope may name


def _mid_run(tmp_path: Path, missing_wait: float) -> tuple[FedServer, list[Message], Sequencer]:
    """A fed server configured by the main server's sync and put in the middle of a run (client
    weights at VERSION - 1, round ROUND - 1 averaged); what it sends is kept in the list."""
    server = FedServer(LinkSettings(port=9), PREFIX, RUN, tmp_path / "ckpt",
                       missing_wait=missing_wait)  # fmt: skip
    published: list[Message] = []
    server.link = SimpleNamespace(publish=lambda _t, data, **_: published.append(decode(data)))
    main = Sequencer(AGGREGATOR_ID, RUN)
    main.seq = time.time_ns() // 1000
    body = {**target().fed_body, "phase": "sync", "clients": [], "weights": []}
    deliver(server, target().sync(AGGREGATOR_ID), encode(main.make(MsgType.FED_ROUND, 0, body)))
    assert server.algo is not None and server.rejects.total == 0, server.rejects.counts
    server.algo.version, server.last_round = VERSION - 1, ROUND - 1
    published.clear()
    return server, published, main


def _answers(published: list[Message]) -> list[tuple[int, dict[str, Any]]]:
    return [(m.env.round, m.env.body) for m in published if m.type is MsgType.FED_PUBLISHED]


def test_a_far_round_that_averaged_nobody_does_not_silence_the_federation(
    tmp_path: Path,
) -> None:
    """A FED_ROUND under the main server's id for a far round, of the right version and with
    no half to average: once its wait is over it is answered (nobody averaged), but neither
    moves the fed server on nor is checkpointed, and the genuine round after it goes through."""
    t = target()
    server, published, main = _mid_run(tmp_path, missing_wait=0.05)
    assert server.algo is not None
    sync = t.sync(AGGREGATOR_ID)
    # One device's half comes before the forged round, the other's after it.
    deliver(server, t.weights_topic(CLIENTS[0]), _update(CLIENTS[0], 1, SAMPLES[0]))
    deliver(server, sync, encode(main.make(MsgType.FED_ROUND, FAR, t.fed_body)))
    assert server.pending is not None and server.pending.env.round == FAR
    time.sleep(0.1)
    server._try_finish()  # what the loop does once the round's wait is over
    assert server.pending is None and server.rejects.counts["missing_update"] == len(CLIENTS)
    assert _answers(published) == [
        (FAR, {"phase": "round", "weights_version": VERSION - 1, "clients": []})
    ]
    assert server.algo.version == VERSION - 1 and server.last_round == ROUND - 1
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()  # no round checkpointed
    assert set(server.held) == {CLIENTS[0]}  # the genuine round's half is kept

    deliver(server, t.weights_topic(CLIENTS[1]), _update(CLIENTS[1], 2, SAMPLES[1]))
    deliver(server, sync, encode(main.make(MsgType.FED_ROUND, ROUND, t.fed_body)))
    assert server.pending is None and server.rejects.counts.get("other_round", 0) == 0
    assert server.algo.version == VERSION and server.last_round == ROUND
    assert _answers(published)[-1] == (
        ROUND, {"phase": "round", "weights_version": VERSION, "clients": CLIENTS}
    )  # fmt: skip
    saved = load_state(tmp_path / "ckpt")
    assert saved is not None and saved[0]["last_round"] == ROUND
    assert [r["round"] for r in saved[1]["rounds"]] == [ROUND]


def test_a_round_of_the_wrong_version_is_refused(tmp_path: Path) -> None:
    """In the round phase the main server asks for the version after the fed server's: any
    other is refused and counted (wrong_version), but not a resend of a finished round, whose
    version is the fed server's own by then, nor a sync, whose version the main server checks."""
    t = target()
    server, published, main = _mid_run(tmp_path, missing_wait=0.0)
    assert server.algo is not None
    sync = t.sync(AGGREGATOR_ID)
    wrong = [VERSION - 1, VERSION + 1, 0, VERSION + 1000]
    for i, version in enumerate(wrong):
        rnd = (ROUND, ROUND + 1, FAR)[i % 3]
        body = {**t.fed_body, "weights_version": version}
        deliver(server, sync, encode(main.make(MsgType.FED_ROUND, rnd, body)))
        assert server.pending is None
    assert dict(server.rejects.counts) == {"wrong_version": len(wrong)}
    assert not published and server.algo.version == VERSION - 1
    assert server.last_round == ROUND - 1 and not (tmp_path / "ckpt").exists()

    # The genuine round, then its resend (the answer was lost), then a sync of the new version.
    for i, cid in enumerate(CLIENTS):
        deliver(server, t.weights_topic(cid), _update(cid, i + 1, SAMPLES[i]))
    for _ in range(2):
        deliver(server, sync, encode(main.make(MsgType.FED_ROUND, ROUND, t.fed_body)))
    body = {**t.fed_body, "phase": "sync", "clients": [], "weights": []}
    deliver(server, sync, encode(main.make(MsgType.FED_ROUND, ROUND + 1, body)))
    answer = {"phase": "round", "weights_version": VERSION, "clients": CLIENTS}
    assert _answers(published) == [
        (ROUND, answer), (ROUND, answer),
        (ROUND + 1, {"phase": "sync", "weights_version": VERSION, "clients": []}),
    ]  # fmt: skip
    assert dict(server.rejects.counts) == {"wrong_version": len(wrong)}
    assert server.algo.version == VERSION and server.last_round == ROUND
