"""The fed server's parts without a broker: the device's side, and the fed server's checks.

A device in a round that names the fed server waits for the client-weights version the round
names, trains from the fed server's half, and splits its update: the half for the fed server,
the counts alone for the main server. The fed server refuses and counts what a peer may send
wrong, and averages the named devices' halves weighted by samples.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from aggregator.fed_server import FedServer
from splitfed.algorithms.sflv1 import SFLV1
from splitfed.checkpoint import load_state
from splitfed.client import CLIENT_PREFIX, ClientRuntime
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.partition import client_shards
from splitfed.model import ModelConfig, build_split_model
from splitfed.mqtt import LinkSettings
from splitfed.training import prefixed, state_to_numpy
from splitfed.wire import FED_SERVER_ID, Message, MsgType, Sequencer, decode, encode

RUN = "u"
MODEL = ModelConfig(widths=(8, 16, 16), cut=1)
TRAIN = TrainConfig(batch_size=16, syncs_per_round=1)  # once-a-round mechanics


def fed_global(seq: Sequencer, version: int, seed: int = 0) -> bytes:
    client, _ = build_split_model(MODEL, seed)
    body = {"algo": "sflv1", "mode": "split", "seed": 0,
            "model": MODEL.model_dump(mode="json"), "weights_version": version}  # fmt: skip
    tensors = prefixed(state_to_numpy(client), CLIENT_PREFIX)
    return encode(seq.make(MsgType.GLOBAL_WEIGHTS, 0, body, tensors))


def test_device_waits_for_the_fed_servers_half_and_trains_from_it(small_synth: Any) -> None:
    _, _, shards = client_shards(small_synth, 2, seed=0)
    dev = ClientRuntime("client-00", RUN, *shards[0])
    algo = SFLV1(MODEL, TRAIN, 0)
    algo.enrol(["client-00"])
    body = {**algo.round_body("client-00"), "fed_server": True}  # weights_version 0
    main, fed = Sequencer("aggregator", RUN), Sequencer(FED_SERVER_ID, RUN)
    # A round that names the fed server and carries no client half: the device waits.
    assert dev.handle_bytes(encode(main.make(MsgType.ROUND_START, 0, body))) == []
    assert dev.rejected == 0 and dev.fed_server
    # The half of the version it names starts it.
    assert [decode(m).type for m in dev.handle_bytes(fed_global(fed, 0))] == [MsgType.SMASHED]
    # An older half than the round names does not.
    dev2 = ClientRuntime("client-01", RUN, *shards[1])
    later = {**body, "weights_version": 1}
    assert dev2.handle_bytes(encode(main.make(MsgType.ROUND_START, 0, later))) == []
    assert dev2.handle_bytes(fed_global(fed, 0)) == []  # not the version the round names
    out = dev2.handle_bytes(fed_global(fed, 1, seed=7))
    assert [decode(m).type for m in out] == [MsgType.SMASHED]
    # It trains from the fed server's half (seed 7's weights), not from its own init: no step
    # yet, so its parameters are that half's (the forward pass moved only BatchNorm's stats).
    want, _ = build_split_model(MODEL, 7)
    assert dev2.client_net is not None
    mine = dict(dev2.client_net.named_parameters())
    for name, p in want.named_parameters():
        assert torch.equal(mine[name], p), name
    # A GLOBAL_WEIGHTS from the main server is not the fed server's: ignored, nothing loaded.
    assert dev2.handle_bytes(encode(main.make(MsgType.GLOBAL_WEIGHTS, 0, {}, {}))) == []


def test_device_splits_its_update_between_fed_and_main_server(small_synth: Any) -> None:
    _, _, shards = client_shards(small_synth, 2, seed=0)
    dev = ClientRuntime("client-00", RUN, *shards[0])
    dev.fed_server = True
    dev._on_round_start(
        Message(
            Sequencer("aggregator", RUN)
            .make(MsgType.ROUND_START, 0, {**SFLV1(MODEL, TRAIN, 0).round_body("client-00")})
            .env,
            prefixed(state_to_numpy(build_split_model(MODEL, 0)[0]), CLIENT_PREFIX),
        )
    )
    assert dev.round is not None
    dev.round.batches = iter(())  # the round's batches are done: the update is next
    to_main = dev._update_message("", {})
    to_fed = dev._fed_outbox
    assert not to_main.tensors and to_main.env.body["n_samples"] == len(shards[0][0])
    assert len(to_fed) == 1 and to_fed[0].type is MsgType.CLIENT_UPDATE
    assert set(to_fed[0].tensors) == set(prefixed(state_to_numpy(dev.client_net), CLIENT_PREFIX))
    assert to_fed[0].env.seq < to_main.env.seq  # the half is sent first


def _fed_round(seq: Sequencer, rnd: int, phase: str, version: int, **extra: Any) -> bytes:
    body = {"phase": phase, "algo": "sflv1", "seed": 0, "model": MODEL.model_dump(mode="json"),
            "train": TRAIN.model_dump(mode="json"),
            "aggregation": AggregationConfig().model_dump(mode="json"),
            "weights_version": version, **extra}  # fmt: skip
    return encode(seq.make(MsgType.FED_ROUND, rnd, body))


def _update(cid: str, seed: int, n: int, rnd: int = 0, seq: Sequencer | None = None) -> bytes:
    client, _ = build_split_model(MODEL, seed)
    body = {"n_samples": n, "steps": 1, "seen": n}
    tensors = prefixed(state_to_numpy(client), CLIENT_PREFIX)
    return encode((seq or Sequencer(cid, RUN)).make(MsgType.CLIENT_UPDATE, rnd, body, tensors))


def test_fed_server_checks_counts_and_averages(tmp_path: Path) -> None:
    server = FedServer(LinkSettings(port=9), "splitfed", RUN, tmp_path / "ckpt")  # never started
    main = Sequencer("aggregator", RUN)
    server.dispatch("client-00", "weights", _update("client-00", 1, 10))
    assert server.rejects.counts["not_configured"] == 1  # before the main server's first word
    server.dispatch("aggregator", "sync", b"\x00" * 3)
    server.dispatch("aggregator", "sync", _fed_round(main, 0, "round", 1, clients=["a"]))
    assert server.rejects.counts["short"] == 1 and server.rejects.counts["bad_body"] == 1
    server.dispatch("aggregator", "sync", _fed_round(main, 0, "sync", 0))
    assert server.algo is not None and server.algo.version == 0

    server.dispatch("client-01", "weights", _update("client-00", 2, 10))  # on another's topic
    assert server.rejects.counts["spoofed_sender"] == 1
    junk = encode(Sequencer("client-01", RUN).make(MsgType.CLIENT_UPDATE, 0,
                  {"n_samples": 5, "steps": 1, "seen": 5},
                  {"w.nope": np.zeros(3, np.float32)}))  # fmt: skip
    server.dispatch("client-01", "weights", junk)
    assert server.rejects.counts["tensor_names"] == 1

    seqs = {c: Sequencer(c, RUN) for c in ("client-00", "client-01")}
    server.dispatch("client-00", "weights", _update("client-00", 1, 30, seq=seqs["client-00"]))
    server.dispatch("client-01", "weights", _update("client-01", 2, 10, seq=seqs["client-01"]))
    # The main server's weights (capped by what it saw) count, never above the device's claim.
    server.dispatch("aggregator", "sync", _fed_round(main, 0, "round", 1,
                    clients=["client-00", "client-01"], weights=[30, 50]))  # fmt: skip
    assert server.algo.version == 1 and server.last_round == 0
    a = state_to_numpy(build_split_model(MODEL, 1)[0])
    b = state_to_numpy(build_split_model(MODEL, 2)[0])
    got = state_to_numpy(server.algo.client_net)
    name = next(k for k, v in a.items() if v.dtype == np.float32 and v.size > 1)
    np.testing.assert_allclose(got[name], (30 * a[name] + 10 * b[name]) / 40, rtol=1e-5)
    # An update for a round already averaged is stale.
    server.dispatch("client-00", "weights", _update("client-00", 1, 30, seq=seqs["client-00"]))
    assert server.rejects.counts["other_round"] == 1
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


def test_fed_server_restarts_resends_and_a_round_no_half_came_to(tmp_path: Path) -> None:
    """The genuine flows around the round's version and a round that averaged nobody: a
    restarted fed server answers the main server's resend of the round it had finished and
    takes the next one; a round none of whose halves came is answered (nobody, the version
    unchanged) but left open, so that the main server, stopped by that answer and resumed from
    its checkpoint, runs it again, against the same process or a restarted one."""
    clients = ["client-00", "client-01"]
    main = Sequencer("aggregator", RUN)
    devices = {c: Sequencer(c, RUN) for c in clients}
    answers: list[tuple[int, dict[str, Any]]] = []

    def publish(_topic: str, data: bytes, **_: Any) -> None:
        msg = decode(data)
        if msg.type is MsgType.FED_PUBLISHED:
            answers.append((msg.env.round, msg.env.body))

    def fed_server(ckpt: Path = tmp_path / "ckpt") -> FedServer:
        server = FedServer(LinkSettings(port=9), "splitfed", RUN, ckpt, missing_wait=0.0)
        server.link = SimpleNamespace(publish=publish)  # never started: its answers are kept
        return server

    def halves(server: FedServer, rnd: int) -> None:
        for i, c in enumerate(clients):
            server.dispatch(c, "weights", _update(c, rnd * 2 + i, 10 + i, rnd, devices[c]))

    def round_(server: FedServer, rnd: int, version: int) -> None:
        pairs = {"clients": clients, "weights": [10, 11]}
        server.dispatch("aggregator", "sync", _fed_round(main, rnd, "round", version, **pairs))

    def averaged(rnd: int, version: int) -> tuple[int, dict[str, Any]]:
        return rnd, {"phase": "round", "weights_version": version, "clients": clients}

    server = fed_server()
    server.dispatch("aggregator", "sync", _fed_round(main, 0, "sync", 0))
    halves(server, 0)
    round_(server, 0, 1)
    assert answers[-1] == averaged(0, 1)
    # Restarted before its answer reached the main server, which says round 0 again: its
    # first word configures the new process from the checkpoint, and is answered as a resend.
    server = fed_server()
    round_(server, 0, 1)
    assert server.algo is not None and server.algo.version == 1 and server.last_round == 0
    assert answers[-1] == averaged(0, 1) and server.rejects.total == 0
    halves(server, 1)
    round_(server, 1, 2)
    assert answers[-1] == averaged(1, 2)
    # Round 2: not one half comes. Answered, nobody averaged, nothing moved or checkpointed.
    round_(server, 2, 3)
    assert answers[-1] == (2, {"phase": "round", "weights_version": 2, "clients": []})
    assert server.algo.version == 2 and server.last_round == 1
    assert dict(server.rejects.counts) == {"missing_update": 2}
    saved = load_state(tmp_path / "ckpt")
    assert saved is not None and saved[0]["last_round"] == 1 and saved[0]["version"] == 2
    assert [r["round"] for r in saved[1]["rounds"]] == [0, 1]
    shutil.copytree(tmp_path / "ckpt", tmp_path / "ckpt-2")
    # The main server stops on that answer (`round_done`), resumes from its checkpoint at
    # round 2 and version 2, syncs and runs round 2 again: against the same fed server, and
    # against one restarted from its checkpoint.
    for fed in (server, fed_server(tmp_path / "ckpt-2")):
        fed.dispatch("aggregator", "sync", _fed_round(main, 2, "sync", 2))
        assert answers[-1] == (2, {"phase": "sync", "weights_version": 2, "clients": []})
        halves(fed, 2)
        round_(fed, 2, 3)
        assert answers[-1] == averaged(2, 3)
        assert fed.algo is not None and fed.algo.version == 3 and fed.last_round == 2
        assert fed.rejects.counts.get("other_round", 0) == 0, fed.rejects.counts
        assert fed.rejects.counts.get("wrong_version", 0) == 0, fed.rejects.counts
