"""Hostile classes against the aggregator of a standard run, and the U-shape's own messages
(a run with --shape u): FEATURES go down, FEATURE_GRADS come up."""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any

import numpy as np

from splitfed.wire import MAX_TENSORS, MsgType, encode

from .base import (
    Batch,
    Sender,
    Target,
    act_entry,
    activations,
    feature_grad,
    huge_int,
    joined,
    other_run_target,
    raw,
    smashed,
)


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
    s, b = joined(t, "deep-envelope")
    for _ in range(n):
        depth = int(10 ** rng.uniform(1.2, 4.7))
        env = json.dumps(s.env(MsgType.SMASHED, step=0))
        env = env[:-2] + ', "x": ' + "[" * depth + "]" * depth + "}}"
        b.hostile.append((s.topic, raw(env)))
    return b


def huge_ints(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Integers beyond int64 wherever one is read: envelope, every body, shapes, offsets."""
    s, b = joined(t, "huge-ints")
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
            env[["round", "seq", "created_at", "ttl", "schema_version"][i % 7 % 5]] = huge_int(rng)
            b.hostile.append((s.topic, raw(env)))
        elif kind == 1:  # a body field
            typ, name = body_fields[int(rng.integers(len(body_fields)))]
            b.hostile.append((s.topic, raw(s.env(typ, **{name: huge_int(rng)}))))
        elif kind == 2:  # a confusion count (the OverflowError of issue 8) or a class count
            conf = [[0] * 7 for _ in range(7)]
            conf[int(rng.integers(7))][int(rng.integers(7))] = huge_int(rng)
            env = s.env(MsgType.EVAL_RESULT, split="test", confusion=conf)
            if i % 2:
                env = s.env(MsgType.JOIN)
                env["body"] = {
                    "client_id": s.cid,
                    "n_train": 0,
                    "n_test": 0,
                    "class_counts": [0] * 6 + [huge_int(rng)],
                    "input_shape": list(t.input_shape),
                }
            b.hostile.append((s.topic, raw(env)))
        elif kind == 3:  # a shape dimension or a data offset
            entry = act_entry(t)
            if i % 2:
                entry["shape"][int(rng.integers(len(entry["shape"])))] = huge_int(rng)
            else:
                entry["data_offsets"][1] = huge_int(rng)
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
    s, b = joined(t, "bounded-ints")
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
    s, b = joined(t, "shape-overflow")
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
    s, b = joined(t, "lying-length")
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
    s, b = joined(t, "wrong-dtype")
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
    s, b = joined(t, "tensor-bytes")
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
    s, b = joined(t, "replay")
    first = s.msg(MsgType.PREDICT, {"activations": activations(t, rng)}, frame=1)
    b.setup.append((s.topic, first))
    for i in range(n):
        b.hostile.append((s.topic, first if i % 4 else b.setup[0][1]))
    return b


def other_run(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Well-formed messages of another run, published on this run's topics."""
    s = Sender(other_run_target(t), "h-other-run")
    b = Batch(sender=s.cid)
    for i in range(n):
        if i % 2:
            b.hostile.append((t.up(s.cid), s.msg(MsgType.SMASHED, smashed(t, rng), step=0)))
        else:
            b.hostile.append((t.up(s.cid), s.join()))
    return b


def other_round(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Smashed data, updates and results for rounds that are not the current one."""
    s, b = joined(t, "other-round")
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
    s, b = joined(t, "spoofed-sender")
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
    s, b = joined(t, "wrong-type")
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
    s, b = joined(t, "feature-grads-standard")
    for i in range(n):
        b.hostile.append(
            (s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": feature_grad(t, rng)}, step=i))
        )
    return b


def non_finite_tensor(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """NaN and infinities in activations that are otherwise right."""
    s, b = joined(t, "non-finite-tensor")
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
    s, b = joined(t, "non-finite-json")
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
    s, b = joined(t, "too-many-tensors")
    for _ in range(n):
        k = int(rng.integers(MAX_TENSORS + 1, MAX_TENSORS + 100))
        tensors = {
            f"t{j}": {"dtype": "U8", "shape": [1], "data_offsets": [j, j + 1]} for j in range(k)
        }
        b.hostile.append((s.topic, raw(s.env(MsgType.PREDICT, frame=0), tensors, bytes(k))))
    return b


def long_strings(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Strings longer than any field needs: in the envelope, in the body, as a tensor name."""
    s, b = joined(t, "long-strings")
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
    s, b = joined(t, "truncated")
    for _ in range(n):
        data = _other_round_bytes(s, t, rng)
        b.hostile.append((s.topic, data[: int(rng.integers(0, len(data)))]))
    return b


def bitflip(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """One to three flipped bits, half of them in the header (the message is for round 99)."""
    s, b = joined(t, "bitflip")
    for i in range(n):
        data = bytearray(_other_round_bytes(s, t, rng))
        end = 8 + struct.unpack("<Q", data[:8])[0] if i % 2 else len(data)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(end))] ^= 1 << int(rng.integers(8))
        b.hostile.append((s.topic, bytes(data)))
    return b


def flood(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """One sender, many large messages as fast as it can (expired ones, so each is refused)."""
    s, b = joined(t, "flood")
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


def feature_grads_shape(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients of the wrong width or rank, none, empty, or beside tensors of their own."""
    s, b = joined(t, "feature-grads-shape")
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
            tensors = {"grad": feature_grad(t, rng), "labels": np.zeros(1, np.int64)}
        elif kind == 5:
            tensors = {}
        else:
            tensors = {"grad": np.zeros((0, f), np.float32)}
        b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, tensors, step=0)))
    return b


def feature_grads_dtype(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients in a dtype other than F32/F16."""
    s, b = joined(t, "feature-grads-dtype")
    dtypes = [np.float64, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
    for i in range(n):
        grad = feature_grad(t, rng).astype(dtypes[i % len(dtypes)])
        b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": grad}, step=0)))
    return b


def feature_grads_non_finite(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """NaN and infinities in head gradients (F32, and F16 that overflows)."""
    s, b = joined(t, "feature-grads-non-finite")
    for i in range(n):
        grad = feature_grad(t, rng)
        grad.flat[int(rng.integers(grad.size))] = [np.nan, np.inf, -np.inf, 7e4][i % 4]
        if i % 4 == 3:
            with np.errstate(over="ignore"):
                grad = grad.astype(np.float16)  # 7e4 is beyond float16: infinity
        b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": grad}, step=0)))
    return b


def feature_grads_round(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients for rounds that are not the current one."""
    s, b = joined(t, "feature-grads-round")
    for _ in range(n):
        rnd = int(rng.integers(1, 1_000_001))
        b.hostile.append(
            (
                s.topic,
                s.msg(MsgType.FEATURE_GRADS, {"grad": feature_grad(t, rng)}, round=rnd, step=0),
            )
        )
    return b


def feature_grads_step(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients whose step is negative, too large, fractional, text, null or missing."""
    s, b = joined(t, "feature-grads-step")
    steps: list[Any] = [-1, 10_000_001, 2**40, 1.5, "x", None, [0]]
    for i in range(n):
        body = {} if i % 8 == 7 else {"step": steps[i % 8 % len(steps)]}
        b.hostile.append(
            (s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": feature_grad(t, rng)}, **body))
        )
    return b


def feature_grads_unasked(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Well-formed head gradients of the current round that answer no FEATURES: no round is
    running, and they reply to nothing, to a made-up id, or to another message."""
    s, b = joined(t, "feature-grads-unasked")
    for i in range(n):
        msg = s.seq.make(MsgType.FEATURE_GRADS, 0, {"step": i % 5}, {"grad": feature_grad(t, rng)},
                         reply_to="" if i % 2 else uuid.uuid4().hex)  # fmt: skip
        b.hostile.append((s.topic, encode(msg)))
    return b


def feature_grads_oversized(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """Head gradients of more rows than any batch: headers that claim billions of elements,
    and (every 25th) real ones of 1,025 rows."""
    s, b = joined(t, "feature-grads-oversized")
    for i in range(n):
        if i % 25 == 24:
            grad = feature_grad(t, rng, batch=1025, dtype=np.float16)
            b.hostile.append((s.topic, s.msg(MsgType.FEATURE_GRADS, {"grad": grad}, step=0)))
            continue
        rows = [2**20, 2**31, 2**40, 10**9][i % 4]
        entry = {"dtype": "F32", "shape": [rows, t.features], "data_offsets": [0, 0]}
        env = s.env(MsgType.FEATURE_GRADS, step=0)
        b.hostile.append((s.topic, raw(env, {"grad": entry})))
    return b


def features_up(t: Target, rng: np.random.Generator, n: int) -> Batch:
    """FEATURES (the aggregator's half of the U-shape) sent up to the aggregator."""
    s, b = joined(t, "features-up")
    for i in range(n):
        feats = {"features": feature_grad(t, rng)}
        b.hostile.append((s.topic, s.msg(MsgType.FEATURES, feats, step=i % 3)))
    return b
