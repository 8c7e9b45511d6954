"""Hostile MQTT messages, one generator per class, and a publisher that runs as its own process.

The fuzz test (and the chaos soak) start `python -m tests.mqtt.hostile ...` next to a real run:
each class publishes under its own sender id (so that one class's sequence numbers or inbox
share never change another's outcome) and says, in `CLASSES`, which reasons the aggregator must
count it under (`rejected_by_reason`, or the transport's `dropped` for topic-level junk).
Classes that need a known sender first send a JOIN without training data (`setup`), which is
accepted and not counted as hostile; each class ends with a JOIN on its topic, whose log line
("client h-... joined" / "re-joined") tells that the aggregator has been through the class.

Only `splitfed.wire` and paho are imported: no torch, so a publisher starts in a blink. The
model's shapes come from a JSON spec file written by the test (`write_spec`).
"""

from __future__ import annotations

import argparse
import json
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitfed.wire import FED_SERVER_ID, MAX_COUNT, MAX_TENSORS, MsgType, Sequencer, encode

Pair = tuple[str, bytes]  # (topic, payload)
AGGREGATOR = "aggregator"  # the aggregator's sender id (splitfed.server.AGGREGATOR_ID)
DTYPES: dict[str, type] = {"F32": np.float32, "I64": np.int64}


@dataclass
class Target:
    """What a hostile publisher needs to know about the run it attacks."""

    run_id: str
    prefix: str
    smashed: tuple[int, ...]  # one sample's activations at the cut
    input_shape: tuple[int, ...]
    weights: dict[str, tuple[str, tuple[int, ...]]]  # client half: wire name -> dtype, shape
    features: int = 0  # U-shape: width of the server half's features (FEATURES, FEATURE_GRADS)
    # With a fed server (FED_SERVER_CLASSES, MAIN_FED_CLASSES): the round the main server asks
    # the fed server to average, and a valid FED_ROUND body of it (phase "round") to tamper with.
    fed_round: int = 0
    fed_body: dict[str, Any] = field(default_factory=dict)

    def up(self, cid: str) -> str:
        return f"{self.prefix}/{self.run_id}/{cid}/up"

    def down(self, cid: str) -> str:
        return f"{self.prefix}/{self.run_id}/{cid}/down"

    def sync(self, cid: str) -> str:
        """FED_ROUND comes on `aggregator/sync`, FED_PUBLISHED on `fed-server/sync`."""
        return f"{self.prefix}/{self.run_id}/{cid}/sync"

    def weights_topic(self, cid: str) -> str:
        """A device's client half, for the fed server alone."""
        return f"{self.prefix}/{self.run_id}/{cid}/weights"

    def zero_weights(self, dtype: type | None = None) -> dict[str, np.ndarray]:
        """The client half's tensors, zero, in their own dtype or all in `dtype`."""
        return {k: np.zeros(shape, dtype or DTYPES[dt]) for k, (dt, shape) in self.weights.items()}


@dataclass
class Batch:
    """A class's messages: `setup` (accepted, e.g. a JOIN) goes first, `hostile` is counted."""

    setup: list[Pair] = field(default_factory=list)
    hostile: list[Pair] = field(default_factory=list)
    sender: str | None = None  # whose topic carries the class; main() ends it with a JOIN


def write_spec(path: Path, target: Target) -> None:
    data = {**target.__dict__, "weights": {k: [d, list(s)] for k, (d, s) in target.weights.items()}}
    path.write_text(json.dumps(data))


def read_spec(path: Path) -> Target:
    d = json.loads(path.read_text())
    return Target(
        d["run_id"],
        d["prefix"],
        tuple(d["smashed"]),
        tuple(d["input_shape"]),
        {k: (dt, tuple(shape)) for k, (dt, shape) in d["weights"].items()},
        int(d.get("features", 0)),
        int(d.get("fed_round", 0)),
        dict(d.get("fed_body", {})),
    )


# ---- building blocks ---------------------------------------------------------------------------


class Sender:
    """One hostile sender id: its sequence, its JOIN, and envelopes to tamper with."""

    def __init__(self, t: Target, cid: str) -> None:
        self.t = t
        self.cid = cid
        self.seq = Sequencer(cid, t.run_id)

    @property
    def topic(self) -> str:
        return self.t.up(self.cid)

    def join(self, client_id: str | None = None) -> bytes:
        body = {
            "client_id": client_id or self.cid,
            "n_train": 0,
            "n_test": 0,
            "class_counts": [0] * 7,
            "input_shape": list(self.t.input_shape),
        }
        return encode(self.seq.make(MsgType.JOIN, 0, body))

    def msg(
        self,
        type: MsgType,
        tensors: dict[str, np.ndarray] | None = None,
        round: int = 0,
        **body: Any,
    ) -> bytes:
        return encode(self.seq.make(type, round, body, tensors))

    def env(self, type: MsgType, round: int = 0, **body: Any) -> dict[str, Any]:
        """A valid envelope as a dict, with a fresh sequence number, for raw messages."""
        self.seq.seq += 1
        return {
            "schema_version": 1,
            "run_id": self.t.run_id,
            "round": round,
            "seq": self.seq.seq,
            "message_id": uuid.uuid4().hex,
            "src": self.cid,
            "reply_to": "",
            "type": type.value,
            "created_at": time.time(),
            "ttl": 0.0,
            "body": body,
        }


def raw(
    env: dict[str, Any] | str, tensors: dict[str, dict[str, Any]] | None = None, data: bytes = b""
) -> bytes:
    """A safetensors file built by hand, so that its header can lie."""
    envelope = env if isinstance(env, str) else json.dumps(env)
    header = json.dumps({"__metadata__": {"envelope": envelope}, **(tensors or {})}).encode()
    return struct.pack("<Q", len(header)) + header + data


def activations(t: Target, rng: np.random.Generator, batch: int = 1) -> np.ndarray:
    return rng.standard_normal((batch, *t.smashed)).astype(np.float32)


def smashed(t: Target, rng: np.random.Generator, batch: int = 1) -> dict[str, np.ndarray]:
    return {"activations": activations(t, rng, batch), "labels": np.zeros(batch, np.int64)}


def act_entry(t: Target, batch: int = 1, offsets: tuple[int, int] | None = None) -> dict[str, Any]:
    n = 4 * batch * int(np.prod(t.smashed))
    return {"dtype": "F32", "shape": [batch, *t.smashed], "data_offsets": list(offsets or (0, n))}


def _joined(t: Target, name: str) -> tuple[Sender, Batch]:
    s = Sender(t, f"h-{name}")
    return s, Batch(setup=[(s.topic, s.join())], sender=s.cid)


# ---- the classes (aggregator side) -------------------------------------------------------------


def deep_header(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """The safetensors header nests `[` or `{"a":` thousands deep (json.loads would recurse)."""
    b = Batch(sender="h-deep-header")
    for i in range(n):
        depth = int(10 ** rng.uniform(1.2, 5.0))
        if i % 3 == 0:
            body = b"[" * depth
        elif i % 3 == 1:
            body = b'{"a":' * (depth // 5 + 13) + b"1"
        else:
            body = b'{"__metadata__":{"envelope":"{}"},"x":' + b"[" * depth + b"]" * depth + b"}"
        b.hostile.append((t.up("h-deep-header"), struct.pack("<Q", len(body)) + body))
    return b


def deep_envelope(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """A valid header whose envelope JSON (a string inside it) nests deep in its body."""
    s, b = _joined(t, "deep-envelope")
    for _ in range(n):
        depth = int(10 ** rng.uniform(1.2, 4.7))
        env = json.dumps(s.env(MsgType.SMASHED, step=0))
        env = env[:-2] + ', "x": ' + "[" * depth + "]" * depth + "}}"
        b.hostile.append((s.topic, raw(env)))
    return b


def _huge(rng: np.random.Generator) -> int:
    sign = -1 if rng.random() < 0.3 else 1
    return sign * (2**63 + int(rng.integers(0, 2**62))) * int(10 ** rng.integers(0, 25))


def huge_ints(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Integers beyond int64 wherever one is read: envelope, every body, shapes, offsets."""
    s, b = _joined(t, "huge-ints")
    body_fields = [
        (MsgType.SMASHED, "step"),
        (MsgType.CLIENT_UPDATE, "n_samples"),
        (MsgType.CLIENT_UPDATE, "steps"),
        (MsgType.CLIENT_UPDATE, "seen"),
        (MsgType.CLIENT_UPDATE, "correct"),
        (MsgType.EVAL_SMASHED, "step"),
        (MsgType.EVAL_SMASHED, "steps"),
        (MsgType.PREDICT, "frame"),
        (MsgType.JOIN, "n_train"),
        (MsgType.JOIN, "n_test"),
    ]
    for i in range(n):
        kind = i % 5
        if kind == 0:  # an envelope field
            env = s.env(MsgType.SMASHED, step=0)
            env[["round", "seq", "created_at", "ttl", "schema_version"][i % 7 % 5]] = _huge(rng)
            b.hostile.append((s.topic, raw(env)))
        elif kind == 1:  # a body field
            typ, name = body_fields[int(rng.integers(len(body_fields)))]
            b.hostile.append((s.topic, raw(s.env(typ, **{name: _huge(rng)}))))
        elif kind == 2:  # a confusion count (the OverflowError of issue 8) or a class count
            conf = [[0] * 7 for _ in range(7)]
            conf[int(rng.integers(7))][int(rng.integers(7))] = _huge(rng)
            env = s.env(MsgType.EVAL_RESULT, split="test", confusion=conf)
            if i % 2:
                env = s.env(MsgType.JOIN)
                env["body"] = {
                    "client_id": s.cid,
                    "n_train": 0,
                    "n_test": 0,
                    "class_counts": [0] * 6 + [_huge(rng)],
                    "input_shape": list(t.input_shape),
                }
            b.hostile.append((s.topic, raw(env)))
        elif kind == 3:  # a shape dimension or a data offset
            entry = act_entry(t)
            if i % 2:
                entry["shape"][int(rng.integers(len(entry["shape"])))] = _huge(rng)
            else:
                entry["data_offsets"][1] = _huge(rng)
            b.hostile.append(
                (s.topic, raw(s.env(MsgType.PREDICT, frame=0), {"activations": entry}))
            )
        else:  # a literal too long to be worth parsing
            digits = "9" * int(rng.integers(41, 5000))
            env = json.dumps(s.env(MsgType.PREDICT, frame=0)).replace(
                '"frame": 0', f'"frame": {digits}'
            )
            b.hostile.append((s.topic, raw(env)))
    return b


def bounded_ints(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Negative or too large (but int64) integers in the envelope and in every body."""
    s, b = _joined(t, "bounded-ints")
    big = lambda: int(rng.integers(10**8, 2**62))  # noqa: E731
    weights = t.zero_weights()
    for i in range(n):
        kind = i % 8
        if kind == 0:
            env = s.env(MsgType.SMASHED, step=0)
            field_, value = [
                ("round", -1),
                ("round", 1_000_001),
                ("seq", -5),
                ("schema_version", -1),
                ("created_at", -3),
                ("ttl", -1),
            ][i % 6]
            env[field_] = value
            b.hostile.append((s.topic, raw(env)))
        elif kind == 1:
            b.hostile.append(
                (s.topic, s.msg(MsgType.SMASHED, smashed(t, rng), step=-1 if i % 2 else big()))
            )
        elif kind == 2:
            conf = [[0] * 7 for _ in range(7)]
            conf[i % 7][(i // 7) % 7] = -1 if i % 2 else big()
            b.hostile.append((s.topic, s.msg(MsgType.EVAL_RESULT, split="test", confusion=conf)))
        elif kind == 3:
            b.hostile.append(
                (s.topic, s.msg(MsgType.PREDICT, {"activations": activations(t, rng)}, frame=-1))
            )
        elif kind == 4:
            body = {
                "client_id": s.cid,
                "n_train": -1 if i % 2 else big(),
                "n_test": 0,
                "class_counts": [0] * 7,
                "input_shape": list(t.input_shape),
            }
            b.hostile.append((s.topic, s.msg(MsgType.JOIN, **body)))
        elif kind == 5:
            b.hostile.append(
                (
                    s.topic,
                    s.msg(
                        MsgType.EVAL_SMASHED,
                        {"activations": activations(t, rng)},
                        split="test",
                        step=0,
                        steps=0 if i % 2 else big(),
                    ),
                )
            )
        elif kind == 6:
            body = (
                {"n_samples": big(), "steps": 1, "seen": 1}
                if i % 2
                else {"n_samples": 1, "steps": -1, "seen": 1}
            )
            b.hostile.append((s.topic, s.msg(MsgType.CLIENT_UPDATE, weights, **body)))
        else:
            body = {
                "client_id": s.cid,
                "n_train": 0,
                "n_test": 0,
                "class_counts": [-1] * 7,
                "input_shape": list(t.input_shape),
            }
            b.hostile.append((s.topic, s.msg(MsgType.JOIN, **body)))
    return b


def shape_overflow(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Shapes whose product overflows int64 (or just dwarfs any message)."""
    s, b = _joined(t, "shape-overflow")
    shapes = [
        [2**40, 2**40],
        [2**31] * 4,
        [2**62, 4],
        [10**6, 10**6],
        [2**21] * 8,
        [1, 2**33, *t.smashed[1:]],
    ]
    for i in range(n):
        entry = {"dtype": "F32", "shape": shapes[i % len(shapes)], "data_offsets": [0, 0]}
        b.hostile.append((s.topic, raw(s.env(MsgType.PREDICT, frame=0), {"activations": entry})))
    return b


def lying_length(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """The 8-byte header length points past the end, into the tensors, or short of the JSON."""
    s, b = _joined(t, "lying-length")
    for i in range(n):
        zeros = {
            "activations": np.zeros((1, *t.smashed), np.float32),
            "labels": np.zeros(1, np.int64),
        }
        data = s.msg(MsgType.SMASHED, zeros, round=99, step=0)  # zeros: no stray brackets
        (real,) = struct.unpack("<Q", data[:8])
        claims = [
            len(data),
            2**63,
            2**64 - 1,
            0,
            int(rng.integers(1, real)),
            real + int(rng.integers(1, len(data) - 8 - real)),
            2 * 1024 * 1024,
        ]
        b.hostile.append((s.topic, struct.pack("<Q", claims[i % len(claims)]) + data[8:]))
    return b


def wrong_dtype(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Every message type the aggregator takes, with tensors of a dtype not allowed for it."""
    s, b = _joined(t, "wrong-dtype")
    x = activations(t, rng)
    for i in range(n):
        kind = i % 6
        if kind == 0:
            dt = [np.float64, np.float16, np.int64, np.uint8, np.int8][i % 5]
            tensors = {"activations": x.astype(dt), "labels": np.zeros(1, np.int64)}
            b.hostile.append((s.topic, s.msg(MsgType.SMASHED, tensors, step=0)))
        elif kind == 1:
            dt = [np.float32, np.int32, np.uint8, np.float64][i % 4]
            b.hostile.append(
                (
                    s.topic,
                    s.msg(MsgType.SMASHED, {"activations": x, "labels": np.zeros(1, dt)}, step=0),
                )
            )
        elif kind == 2:
            b.hostile.append(
                (s.topic, s.msg(MsgType.PREDICT, {"activations": x.astype(np.float64)}, frame=0))
            )
        elif kind == 3:
            b.hostile.append(
                (
                    s.topic,
                    s.msg(
                        MsgType.EVAL_SMASHED,
                        {"activations": x.astype(np.int32)},
                        split="test",
                        step=0,
                        steps=1,
                    ),
                )
            )
        elif kind == 4:
            w = t.zero_weights(np.float16)
            b.hostile.append(
                (s.topic, s.msg(MsgType.CLIENT_UPDATE, w, n_samples=1, steps=1, seen=1))
            )
        else:
            b.hostile.append(
                (s.topic, s.msg(MsgType.PREDICT, {"activations": x.view(np.int32)}, frame=0))
            )
    return b


def tensor_bytes(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Tensor byte ranges that do not match dtype x shape, overlap, leave gaps or overrun."""
    s, b = _joined(t, "tensor-bytes")
    size = 4 * int(np.prod(t.smashed))
    for i in range(n):
        env = s.env(MsgType.PREDICT, frame=0)
        kind = i % 5
        if kind == 0:  # too few bytes for the shape
            cut = int(rng.integers(1, size))
            msg = raw(
                env, {"activations": act_entry(t, offsets=(0, size - cut))}, bytes(size - cut)
            )
        elif kind == 1:  # right range, but extra bytes after it
            msg = raw(env, {"activations": act_entry(t)}, bytes(size + int(rng.integers(1, 99))))
        elif kind == 2:  # a range past the end of the data
            msg = raw(env, {"activations": act_entry(t, offsets=(8, size + 8))}, bytes(size))
        elif kind == 3:  # two tensors on the same bytes
            labels = {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}
            env = s.env(MsgType.SMASHED, step=0)
            msg = raw(env, {"activations": act_entry(t), "labels": labels}, bytes(size))
        else:  # offsets backwards
            msg = raw(env, {"activations": act_entry(t, offsets=(size, 0))}, bytes(size))
        b.hostile.append((s.topic, msg))
    return b


def replay(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Copies of messages already accepted: a PREDICT and the sender's own JOIN."""
    s, b = _joined(t, "replay")
    first = s.msg(MsgType.PREDICT, {"activations": activations(t, rng)}, frame=1)
    b.setup.append((s.topic, first))
    for i in range(n):
        b.hostile.append((s.topic, first if i % 4 else b.setup[0][1]))
    return b


def _other_run(t: Target) -> Target:
    return Target(f"{t.run_id}-other", t.prefix, t.smashed, t.input_shape, t.weights, t.features)


def other_run(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Well-formed messages of another run, published on this run's topics."""
    s = Sender(_other_run(t), "h-other-run")
    b = Batch(sender=s.cid)
    for i in range(n):
        if i % 2:
            b.hostile.append((t.up(s.cid), s.msg(MsgType.SMASHED, smashed(t, rng), step=0)))
        else:
            b.hostile.append((t.up(s.cid), s.join()))
    return b


def other_round(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Smashed data, updates and results for rounds that are not the current one."""
    s, b = _joined(t, "other-round")
    for i in range(n):
        rnd = int(rng.integers(1, 1_000_001))
        if i % 2:
            b.hostile.append((s.topic, s.msg(MsgType.SMASHED, smashed(t, rng), round=rnd, step=0)))
        else:
            conf = [[0] * 7 for _ in range(7)]
            b.hostile.append(
                (s.topic, s.msg(MsgType.EVAL_RESULT, round=rnd, split="test", confusion=conf))
            )
    return b


def spoofed_sender(
    t: Target,
    rng: np.random.Generator,
    n: int,
    victims: tuple[str, ...] = ("client-00", "client-01"),
) -> Batch:
    """Messages that claim another sender than the topic they come on, or JOIN as someone else."""
    s, b = _joined(t, "spoofed-sender")
    for i in range(n):
        victim = victims[i % len(victims)]
        kind = i % 10
        if kind == 0:  # our id on the victim's topic (a little of it: it shares the victim's inbox)
            b.hostile.append((t.up(victim), s.msg(MsgType.SMASHED, smashed(t, rng), step=0)))
        elif kind in (1, 2, 3):  # a JOIN that names the victim
            b.hostile.append((s.topic, s.join(client_id=victim)))
        else:  # the victim's (or the aggregator's) id on our topic
            fake = Sender(t, victim if kind % 2 else "aggregator")
            fake.seq.seq = 10**12 + i  # a sequence far ahead, that would block the real one
            b.hostile.append((s.topic, fake.msg(MsgType.SMASHED, smashed(t, rng), step=0)))
    return b


def unknown_sender(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Senders that never joined, each on its own topic (the last of them closes the class)."""
    b = Batch(sender=f"h-stranger-{min(n, 90) - 1}")
    x = smashed(t, rng)
    for i in range(n):
        s = Sender(t, f"h-stranger-{i % 90}")
        s.seq.seq = i
        b.hostile.append((s.topic, s.msg(MsgType.SMASHED, x, step=0)))
    return b


def wrong_type(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Messages only the aggregator sends (round start, gradients, weights...), sent up to it."""
    s, b = _joined(t, "wrong-type")
    w = t.zero_weights()
    kinds = [
        (MsgType.ROUND_START, w),
        (MsgType.GLOBAL_WEIGHTS, w),
        (MsgType.EVAL_REQUEST, w),
        (MsgType.GRADIENTS, {"grad": activations(t, rng)}),
        (MsgType.EVAL_PREDICTIONS, {"pred": np.zeros(1, np.int64)}),
        (MsgType.PREDICTION, {"probs": np.zeros((1, 7), np.float32)}),
        (MsgType.FEATURES, {"features": np.zeros((1, max(t.features, 1)), np.float32)}),
    ]
    for i in range(n):
        typ, tensors = kinds[i % len(kinds)]
        b.hostile.append((s.topic, s.msg(typ, tensors if i % 3 else None, step=0)))
    return b


def feature_grads_standard(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Well-formed U-shape head gradients sent to a run that is not U-shaped."""
    s, b = _joined(t, "feature-grads-standard")
    for i in range(n):
        b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": _grad(t, rng)}, step=i)))
    return b


def non_finite_tensor(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """NaN and infinities in activations that are otherwise right."""
    s, b = _joined(t, "non-finite-tensor")
    for i in range(n):
        x = activations(t, rng)
        x.flat[int(rng.integers(x.size))] = [np.nan, np.inf, -np.inf][i % 3]
        if i % 3 == 0:
            b.hostile.append(
                (
                    s.topic,
                    s.msg(
                        MsgType.SMASHED, {"activations": x, "labels": np.zeros(1, np.int64)}, step=0
                    ),
                )
            )
        elif i % 3 == 1:
            b.hostile.append((s.topic, s.msg(MsgType.PREDICT, {"activations": x}, frame=0)))
        else:
            b.hostile.append(
                (
                    s.topic,
                    s.msg(MsgType.EVAL_SMASHED, {"activations": x}, split="test", step=0, steps=1),
                )
            )
    return b


def non_finite_json(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """NaN, Infinity and 1e999 in the envelope and the body (JSON that Python would accept)."""
    s, b = _joined(t, "non-finite-json")
    for i in range(n):
        env = s.env(MsgType.CLIENT_UPDATE, n_samples=1, steps=1, seen=1, loss_sum=0.5)
        text = json.dumps(env)
        bad = ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"][i % 5]
        where = ['"loss_sum": 0.5', '"ttl": 0.0', '"created_at": ' + json.dumps(env["created_at"])][
            i % 3
        ]
        key = where.split(":")[0]
        b.hostile.append((s.topic, raw(text.replace(where, f"{key}: {bad}"))))
    return b


def too_many_tensors(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """More tensors than any message has (each a single byte)."""
    s, b = _joined(t, "too-many-tensors")
    for _ in range(n):
        k = int(rng.integers(MAX_TENSORS + 1, MAX_TENSORS + 100))
        tensors = {
            f"t{j}": {"dtype": "U8", "shape": [1], "data_offsets": [j, j + 1]} for j in range(k)
        }
        b.hostile.append((s.topic, raw(s.env(MsgType.PREDICT, frame=0), tensors, bytes(k))))
    return b


def long_strings(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Strings longer than any field needs: in the envelope, in the body, as a tensor name."""
    s, b = _joined(t, "long-strings")
    for i in range(n):
        long = "x" * int(rng.integers(5000, 60000))
        env = s.env(MsgType.LEAVE, reason="bye")
        kind = i % 3
        if kind == 0:
            env["body"]["reason"] = long
            b.hostile.append((s.topic, raw(env)))
        elif kind == 1:
            env["src"] = long
            b.hostile.append((s.topic, raw(env)))
        else:
            entry = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
            b.hostile.append((s.topic, raw(env, {long[: 300 + i % 4000]: entry}, b"\0")))
    return b


def _other_round_bytes(s: Sender, t: Target, rng: np.random.Generator) -> bytes:
    return s.msg(MsgType.SMASHED, smashed(t, rng), round=99, step=0)


def garbage(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Random bytes of random length."""
    b = Batch(sender="h-garbage")
    for _ in range(n):
        b.hostile.append(
            (
                t.up("h-garbage"),
                rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes(),
            )
        )
    return b


def truncated(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Messages cut short anywhere."""
    s, b = _joined(t, "truncated")
    for _ in range(n):
        data = _other_round_bytes(s, t, rng)
        b.hostile.append((s.topic, data[: int(rng.integers(0, len(data)))]))
    return b


def bitflip(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """One to three flipped bits, half of them in the header (the message is for round 99)."""
    s, b = _joined(t, "bitflip")
    for i in range(n):
        data = bytearray(_other_round_bytes(s, t, rng))
        end = 8 + struct.unpack("<Q", data[:8])[0] if i % 2 else len(data)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(end))] ^= 1 << int(rng.integers(8))
        b.hostile.append((s.topic, bytes(data)))
    return b


def flood(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """One sender, many large messages as fast as it can (expired ones, so each is refused)."""
    s, b = _joined(t, "flood")
    tensors = smashed(t, rng, batch=8)
    for _ in range(n):
        msg = s.seq.make(MsgType.SMASHED, 0, {"step": 0}, tensors, ttl=1.0)
        msg.env.created_at -= 100
        b.hostile.append((s.topic, encode(msg)))
    return b


def bad_topic(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Junk status payloads, and client ids that are not ids, on topics the aggregator reads."""
    b = Batch()
    statuses = [b"maybe", b"\xff\xfe", b"online two words", b"ONLINE", b"x" * 500]
    for i in range(n):
        if i % 2:
            b.hostile.append(
                (f"{t.prefix}/{t.run_id}/h-bad-topic/status", statuses[i % len(statuses)])
            )
        else:
            bad_id = ["bad id!", "a.b", "\u00e9t\u00e9", "x" * 65, "semi;colon"][i % 5]
            b.hostile.append((f"{t.prefix}/{t.run_id}/{bad_id}/up", b"\0" * 16))
    return b


# ---- the U-shape's own messages (a run with --shape u) ------------------------------------------


def _grad(t: Target, rng: np.random.Generator, batch: int = 1, dtype: type = np.float32) -> Any:
    return rng.standard_normal((batch, max(t.features, 1))).astype(dtype)


def feature_grads_shape(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients of the wrong width or rank, none, empty, or beside tensors of their own."""
    s, b = _joined(t, "feature-grads-shape")
    f = t.features
    for i in range(n):
        kind = i % 7
        if kind == 0:
            tensors = {"grad": rng.standard_normal((1, f + int(rng.integers(1, 64)))).astype("f4")}
        elif kind == 1:
            tensors = {"grad": rng.standard_normal((2, f - int(rng.integers(1, f)))).astype("f4")}
        elif kind == 2:
            tensors = {"grad": rng.standard_normal((1, f, 1)).astype(np.float32)}
        elif kind == 3:
            tensors = {"grad": rng.standard_normal(f).astype(np.float32)}
        elif kind == 4:
            tensors = {"grad": _grad(t, rng), "labels": np.zeros(1, np.int64)}
        elif kind == 5:
            tensors = {}
        else:
            tensors = {"grad": np.zeros((0, f), np.float32)}
        b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, tensors, step=0)))
    return b


def feature_grads_dtype(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients in a dtype other than F32/F16."""
    s, b = _joined(t, "feature-grads-dtype")
    dtypes = [np.float64, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
    for i in range(n):
        grad = _grad(t, rng).astype(dtypes[i % len(dtypes)])
        b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": grad}, step=0)))
    return b


def feature_grads_non_finite(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """NaN and infinities in head gradients (F32, and F16 that overflows)."""
    s, b = _joined(t, "feature-grads-non-finite")
    for i in range(n):
        grad = _grad(t, rng)
        grad.flat[int(rng.integers(grad.size))] = [np.nan, np.inf, -np.inf, 7e4][i % 4]
        if i % 4 == 3:
            with np.errstate(over="ignore"):
                grad = grad.astype(np.float16)  # 7e4 is beyond float16: infinity
        b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": grad}, step=0)))
    return b


def feature_grads_round(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients for rounds that are not the current one."""
    s, b = _joined(t, "feature-grads-round")
    for _ in range(n):
        rnd = int(rng.integers(1, 1_000_001))
        b.hostile.append(
            (s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": _grad(t, rng)}, round=rnd, step=0))
        )
    return b


def feature_grads_step(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients whose step is negative, too large, fractional, text, null or missing."""
    s, b = _joined(t, "feature-grads-step")
    steps: list[Any] = [-1, 10_000_001, 2**40, 1.5, "x", None, [0]]
    for i in range(n):
        body = {} if i % 8 == 7 else {"step": steps[i % 8 % len(steps)]}
        b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": _grad(t, rng)}, **body)))
    return b


def feature_grads_unasked(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Well-formed head gradients of the current round that answer no FEATURES: no round is
    running, and they reply to nothing, to a made-up id, or to another message."""
    s, b = _joined(t, "feature-grads-unasked")
    for i in range(n):
        msg = s.seq.make(MsgType.FEATURE_GRADS, 0, {"step": i % 5}, {"grad": _grad(t, rng)},
                         reply_to="" if i % 2 else uuid.uuid4().hex)  # fmt: skip
        b.hostile.append((s.topic, encode(msg)))
    return b


def feature_grads_oversized(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients of more rows than any batch: headers that claim billions of elements,
    and (every 25th) real ones of 1,025 rows."""
    s, b = _joined(t, "feature-grads-oversized")
    for i in range(n):
        if i % 25 == 24:
            grad = _grad(t, rng, batch=1025, dtype=np.float16)
            b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": grad}, step=0)))
            continue
        rows = [2**20, 2**31, 2**40, 10**9][i % 4]
        entry = {"dtype": "F32", "shape": [rows, t.features], "data_offsets": [0, 0]}
        env = s.env(MsgType.FEATURE_GRADS, step=0)
        b.hostile.append((s.topic, raw(env, {"grad": entry})))
    return b


def features_up(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FEATURES (the aggregator's half of the U-shape) sent up to the aggregator."""
    s, b = _joined(t, "features-up")
    for i in range(n):
        feats = {"features": _grad(t, rng)}
        b.hostile.append((s.topic, s.msg(MsgType.FEATURES, feats, step=i % 3)))
    return b


# ---- with a separate fed server (`serve --fed-server` + `aggregator fed-server`) --------------
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
        weights[i % len(weights)] = _huge(rng) if i % 6 == 5 else values[i % len(values)]
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
            b.hostile.append((t.weights_topic(victim), _fed_round(_forged_aggregator(t, i), t)))
        elif kind == 4:
            b.hostile.append((t.sync(AGGREGATOR), genuine))
        elif kind == 5:
            other = _forged_aggregator(_other_run(t), i)
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
            env["body"]["weights_version"] = _huge(rng)
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
            other = Sender(_other_run(t), FED_SERVER_ID)
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


@dataclass(frozen=True)
class HostileClass:
    make: Callable[[Target, np.random.Generator, int], Batch]
    reasons: frozenset[str]  # where the aggregator must count it (empty: any reason)
    counted: str = "rejected"  # "rejected" (ServerIO) or "dropped" (MqttTransport)


def _c(make: Callable[..., Batch], *reasons: str, counted: str = "rejected") -> HostileClass:
    return HostileClass(make, frozenset(reasons), counted)


CLASSES: dict[str, HostileClass] = {
    "deep_header": _c(deep_header, "header_depth"),
    "deep_envelope": _c(deep_envelope, "envelope_depth"),
    "huge_ints": _c(huge_ints, "int_too_large"),
    "bounded_ints": _c(bounded_ints, "bad_envelope", "bad_body"),
    "shape_overflow": _c(shape_overflow, "shape_too_large"),
    "lying_length": _c(lying_length, "header_length", "header_json", "tensor_bytes"),
    "wrong_dtype": _c(wrong_dtype, "wrong_dtype"),
    "tensor_bytes": _c(tensor_bytes, "tensor_bytes"),
    "replay": _c(replay, "replay"),
    "other_run": _c(other_run, "other_run"),
    "other_round": _c(other_round, "other_round"),
    "spoofed_sender": _c(spoofed_sender, "spoofed_sender"),
    "unknown_sender": _c(unknown_sender, "unknown_sender"),
    "wrong_type": _c(wrong_type, "unexpected_type"),
    "non_finite_tensor": _c(non_finite_tensor, "non_finite"),
    "non_finite_json": _c(non_finite_json, "non_finite_json"),
    "too_many_tensors": _c(too_many_tensors, "too_many_tensors"),
    "long_strings": _c(long_strings, "string_too_long"),
    "garbage": _c(garbage),
    "truncated": _c(truncated),
    "bitflip": _c(bitflip),
    "flood": _c(flood, "expired", "sender_over_budget"),
    "bad_topic": _c(bad_topic, "bad_status", "foreign_topic", counted="dropped"),
    "feature_grads_standard": _c(feature_grads_standard, "unexpected_type"),
}

# Against a U-shaped run (`serve --shape u`): FEATURES go down, FEATURE_GRADS come up.
U_CLASSES: dict[str, HostileClass] = {
    "feature_grads_shape": _c(feature_grads_shape, "wrong_shape", "tensor_names", "batch_size"),
    "feature_grads_dtype": _c(feature_grads_dtype, "wrong_dtype"),
    "feature_grads_non_finite": _c(feature_grads_non_finite, "non_finite"),
    "feature_grads_round": _c(feature_grads_round, "other_round"),
    "feature_grads_step": _c(feature_grads_step, "bad_body"),
    "feature_grads_unasked": _c(feature_grads_unasked, "unasked"),
    "feature_grads_oversized": _c(feature_grads_oversized, "shape_too_large", "batch_size"),
    "features_up": _c(features_up, "unexpected_type"),
}
ALL_CLASSES = {**CLASSES, **U_CLASSES}

# With a separate fed server. Deliberately not in ALL_CLASSES: the fuzz and soak runs have no
# fed server (their aggregator reads neither `aggregator/sync` nor `fed-server/sync`), and
# these classes sign as the main server or the fed server from sequence 1, which only a
# receiver that has heard neither yet takes in order. tests/mqtt/test_fed_fuzz.py feeds each
# class to its receiver in-process and then checks that a genuine message still gets through.
# Received by the fed server (counted in `FedServer.rejects`):
FED_SERVER_CLASSES: dict[str, HostileClass] = {
    "fed_round_clients": _c(fed_round_clients, "bad_body"),
    "fed_round_weights": _c(fed_round_weights, "bad_body", "int_too_large"),
    "fed_round_fields": _c(fed_round_fields, "bad_body"),
    "fed_round_envelope": _c(fed_round_envelope, "bad_envelope", "expired"),
    "fed_round_version": _c(fed_round_version, "wrong_version"),
    "fed_round_forged": _c(
        fed_round_forged, "spoofed_sender", "unexpected_type", "replay", "other_run", "tensor_names"
    ),
}
# Received by the main server (`aggregator serve --fed-server`, in `MainFedLink.rejects`):
MAIN_FED_CLASSES: dict[str, HostileClass] = {
    "fed_published_version": _c(
        fed_published_version, "bad_body", "int_too_large", "unasked", "replay"
    ),
    "fed_published_fields": _c(fed_published_fields, "bad_body", "string_too_long"),
    "fed_published_forged": _c(
        fed_published_forged,
        "spoofed_sender",
        "other_run",
        "tensor_names",
        "unexpected_type",
        "expired",
    ),
}


# ---- the agent side ----------------------------------------------------------------------------

AGENT_REASONS = frozenset({"header_depth", "other_run", "unknown_sender", "int_too_large"})
# What agents of a standard run also refuse: the U-shape's messages (features of a U-shaped
# run's head, head gradients that only the aggregator takes).
AGENT_U_REASONS = frozenset({"bad_body", "unexpected_type"})
# Agents of a U-shaped run: forged features of a far round, of the wrong width or dtype, with
# NaN; head gradients sent down to them.
AGENT_U_RUN_REASONS = frozenset({"wrong_shape", "wrong_dtype", "non_finite", "unexpected_type"})


def agent_junk(t: Target, rng: np.random.Generator, n: int, client_id: str) -> Batch:
    """Junk on an agent's `down` topic: deep nesting, another run, a stranger, huge ints."""
    b = Batch()
    stranger = Sender(t, "h-agent-junk")
    other = Sender(_other_run(t), AGGREGATOR)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            body = b"[" * int(rng.integers(100, 100_000))
            msg = struct.pack("<Q", len(body)) + body
        elif kind == 1:
            msg = other.msg(MsgType.GRADIENTS, {"grad": activations(t, rng)}, step=0, loss=1.0)
        elif kind == 2:
            msg = stranger.msg(MsgType.GRADIENTS, {"grad": activations(t, rng)}, step=0, loss=1.0)
        else:
            env = stranger.env(MsgType.GRADIENTS, step=_huge(rng), loss=1.0)
            msg = raw(env)
        b.hostile.append((t.down(client_id), msg))
    b.hostile += agent_u_junk(t, rng, max(n // 4, 2), client_id).hostile
    return b


def _forged_aggregator(t: Target, i: int) -> Sender:
    """The aggregator's id with a sequence far ahead of the real one: accepted, it would
    block the real aggregator; refused, it must leave no trace (neither seq nor round)."""
    fake = Sender(t, AGGREGATOR)
    fake.seq.seq = 2**62 + i  # (a real aggregator counts from its start time in microseconds)
    return fake


def agent_u_junk(t: Target, rng: np.random.Generator, n: int, client_id: str) -> Batch:
    """The U-shape's messages on an agent's `down` topic, under the aggregator's id.

    FEATURE_GRADS (only the aggregator takes them), and FEATURES: of a standard run (no head
    on the device), or in a U-shaped run of a far round with the wrong width, dtype or NaN.
    """
    b = Batch()
    f = max(t.features, 1)
    for i in range(n):
        fake = _forged_aggregator(t, i)
        kind = i % 4
        rnd = int(rng.integers(1000, 1_000_000))  # a far round: it must not move the agent on
        if kind == 0:
            msg = fake.msg(MsgType.FEATURE_GRADS, {"grad": _grad(t, rng)}, round=rnd, step=0)
        elif kind == 1:
            feats = rng.standard_normal((1, f + 1 if t.features else f)).astype(np.float32)
            msg = fake.msg(MsgType.FEATURES, {"features": feats}, round=rnd, step=0)
        elif kind == 2:
            feats = _grad(t, rng, dtype=np.float64 if t.features else np.float32)
            msg = fake.msg(MsgType.FEATURES, {"features": feats}, round=rnd, step=0)
        else:
            feats = _grad(t, rng)
            feats.flat[int(rng.integers(feats.size))] = np.nan
            msg = fake.msg(MsgType.FEATURES, {"features": feats}, round=rnd, step=0)
        b.hostile.append((t.down(client_id), msg))
    return b


# ---- publishing (the process) ------------------------------------------------------------------


def write_pairs(path: Path, pairs: list[Pair]) -> None:
    """Messages to a file (length-prefixed topic and payload), for a publisher to replay."""
    with path.open("wb") as f:
        for name, payload in pairs:
            t = name.encode()
            f.write(struct.pack("<II", len(t), len(payload)) + t + payload)


def read_pairs(path: Path) -> list[Pair]:
    data = path.read_bytes()
    out: list[Pair] = []
    pos = 0
    while pos < len(data):
        nt, np_ = struct.unpack_from("<II", data, pos)
        pos += 8
        out.append((data[pos : pos + nt].decode(), data[pos + nt : pos + nt + np_]))
        pos += nt + np_
    return out


def publish(broker: str, pairs: list[Pair], client_id: str, timeout: float = 60.0) -> None:
    """Publish at QoS 1 as fast as the broker takes them, and wait until it has them all."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = broker.rsplit("/", 1)[-1].split(":")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(host, int(port))
    c.loop_start()
    try:
        infos = [c.publish(name, payload, qos=1) for name, payload in pairs]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    finally:
        c.disconnect()
        c.loop_stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    p.add_argument("--spec", type=Path, required=True, help="JSON from write_spec")
    p.add_argument("--classes", default="", help="comma-separated names from CLASSES")
    p.add_argument("--count", type=int, default=100, help="hostile messages per class")
    p.add_argument("--agents", default="", help="comma-separated client ids to send junk to")
    p.add_argument("--replay", type=Path, help="a write_pairs file to publish twice, as replays")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--report", type=Path, required=True, help="JSON: hostile messages sent, by class"
    )
    a = p.parse_args(argv)
    t = read_spec(a.spec)
    rng = np.random.default_rng(a.seed)
    sent: dict[str, int] = {}
    setup: list[Pair] = []
    hostile: list[Pair] = []
    markers: dict[str, str] = {}  # sender -> what the aggregator logs for its closing JOIN
    closing: list[Pair] = []
    for name in filter(None, a.classes.split(",")):
        batch = ALL_CLASSES[name].make(t, rng, a.count)
        setup += batch.setup
        hostile += batch.hostile
        sent[name] = len(batch.hostile)
        if batch.sender is not None:
            # Accepted after the class's every message (one topic is one ordered queue), so
            # the aggregator's log line says when the whole class has been dealt with.
            joined = any(topic == t.up(batch.sender) for topic, _ in batch.setup)
            markers[batch.sender] = "re-joined" if joined else "joined"
            closing.append((t.up(batch.sender), Sender(t, batch.sender).join()))
    for cid in filter(None, a.agents.split(",")):
        batch = agent_junk(t, rng, a.count, cid)
        hostile += batch.hostile
        sent[f"agent:{cid}"] = len(batch.hostile)
    if a.replay is not None:
        copies = read_pairs(a.replay) * 2
        hostile += copies
        sent["honest_replay"] = len(copies)
    publish(a.broker, setup, f"hostile-setup-{a.seed}")  # JOINs first, and all of them in
    publish(a.broker, hostile + closing, f"hostile-{a.seed}")
    a.report.write_text(json.dumps({"sent": sent, "markers": markers}))


if __name__ == "__main__":
    main()
