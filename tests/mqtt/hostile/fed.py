"""Hostile FED_ROUND and FED_PUBLISHED, with a separate fed server (`serve --fed-server` +
`aggregator fed-server`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from splitfed.wire import FED_SERVER_ID, MAX_COUNT, MsgType, encode

from .base import (
    AGGREGATOR,
    Batch,
    Sender,
    Target,
    forged_aggregator,
    huge_int,
    other_run_target,
    raw,
)

#
# FED_ROUND (main server -> fed server, on `aggregator/sync`) and FED_PUBLISHED (fed server ->
# main server, on `fed-server/sync`). The classes that sign as the main server or as the fed
# server count from sequence number 1 (the real ones count from their start time in
# microseconds): a genuine message after a class is new to the receiver.

VICTIMS = ("client-00", "client-01")  # devices whose ids a forger borrows


def _fed_main(t: Target) -> tuple[Sender, Batch]:
    """The main server's id, and its valid sync FED_ROUND first (it configures the fed server)."""
    s = Sender(t, AGGREGATOR)
    version = max(int(t.fed_body["weights_version"]) - 1, 0)
    sync = {**t.fed_body, "phase": "sync", "clients": [], "weights": [], "weights_version": version}
    first = s.msg(MsgType.FED_ROUND, round=t.fed_round, **sync)
    return s, Batch(setup=[(t.sync(AGGREGATOR), first)])


def _fed_round(
    s: Sender,
    t: Target,
    tensors: dict[str, np.ndarray] | None = None,
    drop: str = "",
    **changes: Any,
) -> bytes:
    """The round's FED_ROUND signed by `s`, with `changes` to its body and without `drop`."""
    body = {k: v for k, v in {**t.fed_body, **changes}.items() if k != drop}
    return encode(s.seq.make(MsgType.FED_ROUND, t.fed_round, body, tensors))


def fed_round_clients(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_ROUND whose clients cannot be the round's: lists that do not pair with the weights,
    duplicates, the servers' own ids, ids that are no ids, no list, one over the limit."""
    s, b = _fed_main(t)
    a, c = VICTIMS
    bad_ids: list[Any] = ["bad id!", "x" * 65, "", "a/b", "+", "#", 7, None, [a]]
    not_lists: list[Any] = [a, {a: 10}, 5, None]
    for i in range(n):
        kind = i % 8
        clients: Any
        if kind == 0:
            clients, weights = [a, c], [10]
        elif kind == 1:
            clients, weights = [a], [10, 20]
        elif kind == 2:
            clients, weights = [a, a], [10, 10]
        elif kind == 3:
            clients, weights = [a, (AGGREGATOR, FED_SERVER_ID)[i % 2]], [10, 10]
        elif kind == 4:
            clients, weights = [a, bad_ids[i % len(bad_ids)]], [10, 10]
        elif kind == 5:
            clients, weights = not_lists[i % len(not_lists)], [10]
        elif kind == 6:
            clients, weights = [], [10]
        else:
            clients = [f"c{j}" for j in range(10_001)]  # one over MAX_CLIENTS
            weights = [1] * len(clients)
        b.hostile.append((t.sync(AGGREGATOR), _fed_round(s, t, clients=clients, weights=weights)))
    return b


def fed_round_weights(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_ROUND whose sample weights are negative, too large, beyond int64 or no integers."""
    s, b = _fed_main(t)
    values: list[Any] = [-1, -(2**40), MAX_COUNT + 1, 2**62, 1.5, 2.0, "3", True, None, [1], {}]
    for i in range(n):
        weights: list[Any] = [10] * len(t.fed_body["clients"])
        weights[i % len(weights)] = huge_int(rng) if i % 6 == 5 else values[i % len(values)]
        b.hostile.append((t.sync(AGGREGATOR), _fed_round(s, t, weights=weights)))
    return b


def fed_round_fields(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_ROUND with a field missing, one too many, or one of the wrong kind or value."""
    s, b = _fed_main(t)
    required = ["phase", "algo", "seed", "model", "train", "aggregation", "weights_version"]
    wrong: list[tuple[str, Any]] = [
        ("phase", "average"), ("phase", ""), ("phase", None), ("algo", "sl"), ("algo", "fedavg"),
        ("algo", "SFLV1"), ("weights_version", -1), ("weights_version", MAX_COUNT + 1),
        ("weights_version", 1.5), ("weights_version", [1]), ("seed", 2**62 + 1),
        ("seed", None), ("model", "x"), ("model", [1]), ("train", "x"), ("aggregation", 5),
    ]  # fmt: skip
    extra: list[tuple[str, Any]] = [
        ("client_half", [0.0] * 8), ("round", t.fed_round), ("unexpected", 1),
    ]  # fmt: skip
    for i in range(n):
        kind = i % 3
        if kind == 0:
            msg = _fed_round(s, t, drop=required[i % len(required)])
        else:
            name, value = wrong[i % len(wrong)] if kind == 1 else extra[i % len(extra)]
            msg = _fed_round(s, t, **{name: value})
        b.hostile.append((t.sync(AGGREGATOR), msg))
    return b


def fed_round_envelope(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_ROUND in a wrong envelope: a round out of range, expired, a run id that is no id,
    a body that is no object."""
    s, b = _fed_main(t)
    for i in range(n):
        env = s.env(MsgType.FED_ROUND, round=t.fed_round, **t.fed_body)
        kind = i % 4
        if kind == 0:
            env["round"] = [-1, 1_000_001, -(2**40)][i % 3]
        elif kind == 1:
            env["created_at"], env["ttl"] = time.time() - 100, 1.0
        elif kind == 2:
            env["run_id"] = f"{t.run_id}/+"
        else:
            env["body"] = [list(t.fed_body), "phase=round"][i % 2]
        b.hostile.append((t.sync(AGGREGATOR), raw(env)))
    return b


def fed_round_version(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_ROUND of this round or a later one (up to the furthest an envelope may name) that
    asks for another version than the one after the fed server's: its own (nothing to
    average), an older one, one or many ahead. Taken in, a far round that averaged nobody
    would have moved the fed server past every genuine round."""
    s, b = _fed_main(t)
    want = int(t.fed_body["weights_version"])  # the fed server is at want - 1
    for i in range(n):
        kind = i % 4
        if kind == 0:
            version = max(want - 1, 0)
        elif kind == 1:
            version = max(want - int(rng.integers(2, 1000)), 0)
        elif kind == 2:
            version = want + 1
        else:
            version = min(want + int(rng.integers(2, 2**31)), MAX_COUNT)
        if version == want:  # (no older version to name)
            version = want + 1
        ahead = [0, 1, int(rng.integers(2, 1000)), 1_000_000 - t.fed_round][(i // 4) % 4]
        rnd = t.fed_round + ahead
        body = {**t.fed_body, "weights_version": version}
        b.hostile.append((t.sync(AGGREGATOR), s.msg(MsgType.FED_ROUND, round=rnd, **body)))
    return b


def fed_round_forged(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_ROUND not from the main server: a device's id or the fed server's on the main
    server's topic, a device's own on its `weights` topic, the main server's id on a device's
    topic; a replay of the main server's, another run's, one carrying the client half, and
    other message types on the main server's topic."""
    s, b = _fed_main(t)
    genuine = b.setup[0][1]
    for i in range(n):
        victim = VICTIMS[i % len(VICTIMS)]
        kind = i % 8
        if kind == 0:  # a device's id (far ahead: accepted, it would block the real one)
            forger = Sender(t, victim)
            forger.seq.seq = 2**62 + i
            b.hostile.append((t.sync(AGGREGATOR), _fed_round(forger, t)))
        elif kind == 1:
            b.hostile.append((t.sync(AGGREGATOR), _fed_round(Sender(t, FED_SERVER_ID), t)))
        elif kind == 2:
            b.hostile.append((t.weights_topic(victim), _fed_round(Sender(t, victim), t)))
        elif kind == 3:
            b.hostile.append((t.weights_topic(victim), _fed_round(forged_aggregator(t, i), t)))
        elif kind == 4:
            b.hostile.append((t.sync(AGGREGATOR), genuine))
        elif kind == 5:
            other = forged_aggregator(other_run_target(t), i)
            b.hostile.append((t.sync(AGGREGATOR), _fed_round(other, t)))
        elif kind == 6:  # a client half, as if the main server held one
            b.hostile.append((t.sync(AGGREGATOR), _fed_round(s, t, t.zero_weights())))
        else:
            typ = [MsgType.ROUND_START, MsgType.GLOBAL_WEIGHTS, MsgType.FED_PUBLISHED][i % 3]
            b.hostile.append((t.sync(AGGREGATOR), s.msg(typ, round=t.fed_round, **t.fed_body)))
    return b


def _fed_answer(t: Target, drop: str = "", **changes: Any) -> dict[str, Any]:
    """The body of the FED_PUBLISHED the main server waits for, with `changes`, less `drop`."""
    body = {"phase": "round", "weights_version": t.fed_body["weights_version"],
            "clients": list(t.fed_body["clients"]), **changes}  # fmt: skip
    return {k: v for k, v in body.items() if k != drop}


def fed_published_version(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_PUBLISHED of a version that is no version, or answering another question: an older
    round (of an older version), a later one, this round's sync; and copies of them."""
    s, b = Sender(t, FED_SERVER_ID), Batch()
    version, r = int(t.fed_body["weights_version"]), t.fed_round
    bad: list[Any] = [-1, MAX_COUNT + 1, 1.5, None, "x", [], {}]
    for i in range(n):
        kind = i % 6
        if kind == 0:
            value = bad[i % len(bad)]
            msg = s.msg(MsgType.FED_PUBLISHED, round=r, **_fed_answer(t, weights_version=value))
        elif kind == 1:
            env = s.env(MsgType.FED_PUBLISHED, round=r, **_fed_answer(t))
            env["body"]["weights_version"] = huge_int(rng)
            msg = raw(env)
        elif kind == 2:  # an older round's answer, of an older version
            k = int(rng.integers(1, 5))
            body = _fed_answer(t, weights_version=max(version - k, 0))
            if r - k < 0:  # no older round: the sync of this one
                body["phase"] = "sync"
            msg = s.msg(MsgType.FED_PUBLISHED, round=max(r - k, 0), **body)
        elif kind == 3:  # this round's sync answer (the version before the round's)
            body = _fed_answer(t, phase="sync", weights_version=max(version - 1, 0), clients=[])
            msg = s.msg(MsgType.FED_PUBLISHED, round=r, **body)
        elif kind == 4:  # a later round's
            k = int(rng.integers(1, 1000))
            body = _fed_answer(t, weights_version=version + k)
            msg = s.msg(MsgType.FED_PUBLISHED, round=r + k, **body)
        else:  # a copy of one of the above
            msg = b.hostile[-int(rng.integers(1, 6))][1]
        b.hostile.append((t.sync(FED_SERVER_ID), msg))
    return b


def fed_published_fields(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_PUBLISHED with a field too many (a client half, a note), one missing, or one of the
    wrong kind: a phase that is none, clients that are no ids or no list, too many of them."""
    s, b = Sender(t, FED_SERVER_ID), Batch()
    changes: list[dict[str, Any]] = [
        {"client_half": [0.0] * 8}, {"note": "x"}, {"round": t.fed_round}, {"drop": "phase"},
        {"drop": "weights_version"}, {"phase": "average"}, {"phase": 1}, {"phase": None},
        {"clients": ["bad id!"]}, {"clients": "client-00"}, {"clients": [None]},
        {"clients": [f"c{j}" for j in range(10_001)]}, {"clients": ["x" * 5000]},
    ]  # fmt: skip
    for i in range(n):
        body = _fed_answer(t, **changes[i % len(changes)])  # (one has a "round" of its own)
        msg = encode(s.seq.make(MsgType.FED_PUBLISHED, t.fed_round, body))
        b.hostile.append((t.sync(FED_SERVER_ID), msg))
    return b


def fed_published_forged(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FED_PUBLISHED not from the fed server: a device's or the main server's id on its topic,
    another run's, one that hands the main server the client half, other message types from
    the fed server's id, an expired one."""
    s, b = Sender(t, FED_SERVER_ID), Batch()
    body = _fed_answer(t)
    for i in range(n):
        kind = i % 5
        if kind == 0:  # (far ahead: accepted, it would block the real one)
            forger = Sender(t, (*VICTIMS, AGGREGATOR)[i % 3])
            forger.seq.seq = 2**62 + i
            msg = forger.msg(MsgType.FED_PUBLISHED, round=t.fed_round, **body)
        elif kind == 1:
            other = Sender(other_run_target(t), FED_SERVER_ID)
            other.seq.seq = 2**62 + i
            msg = other.msg(MsgType.FED_PUBLISHED, round=t.fed_round, **body)
        elif kind == 2:  # the client half, which the main server must never receive
            msg = s.msg(MsgType.FED_PUBLISHED, t.zero_weights(), round=t.fed_round, **body)
        elif kind == 3:
            typ = [MsgType.GLOBAL_WEIGHTS, MsgType.FED_ROUND, MsgType.CLIENT_UPDATE][i % 3]
            msg = s.msg(typ, round=t.fed_round, **body)
        else:
            late = s.seq.make(MsgType.FED_PUBLISHED, t.fed_round, body, ttl=1.0)
            late.env.created_at -= 100
            msg = encode(late)
        b.hostile.append((t.sync(FED_SERVER_ID), msg))
    return b
