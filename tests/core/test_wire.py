"""The wire protocol: round trips, and every kind of bad message rejected with a reason."""

from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest

from splitfed.wire import (
    MAX_MESSAGE_BYTES,
    MAX_TENSORS,
    Message,
    MsgType,
    RejectLog,
    Sequencer,
    Validator,
    WireError,
    activation_spec,
    check_body,
    decode,
    encode,
    pack_activations,
    read_header,
    unpack_activations,
)

SHAPE = (4, 3, 5)


def smashed(seq: Sequencer, x: np.ndarray | None = None, round: int = 0, **over: object) -> Message:
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32) if x is None else x
    t = {**pack_activations(x, "fp32"), "labels": np.array([1, 2])}
    t.update(over)  # type: ignore[arg-type]
    return seq.make(MsgType.SMASHED, round, {"step": 0}, t)


def validator(**kw: object) -> Validator:
    spec = {**activation_spec("fp32", SHAPE), "labels": (frozenset({"I64"}), (-1,))}
    return Validator("run1", {MsgType.SMASHED: spec}, **kw)  # type: ignore[arg-type]


def test_round_trip_keeps_envelope_and_tensors() -> None:
    msg = smashed(Sequencer("client-00", "run1"))
    back = decode(encode(msg))
    assert back.env == msg.env
    np.testing.assert_array_equal(back.tensors["activations"], msg.tensors["activations"])


def test_payload_is_safetensors_not_pickle() -> None:
    data = encode(smashed(Sequencer("c", "run1")))
    (n,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{" and b"envelope" in data[8 : 8 + n]
    assert b"\x80\x04" not in data[:2]  # no pickle protocol header


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:5], "shorter"),
        (lambda d: b"\xff" * 8 + d[8:], "header length"),
        (lambda d: d[:8] + b"[" + d[9:], "JSON"),
        (lambda d: d[:-7], "tensor data"),
    ],
)
def test_corrupt_bytes_are_rejected(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    data = encode(smashed(Sequencer("c", "run1")))
    with pytest.raises(WireError, match=reason):
        validator().check(mutate(data))


def test_semantic_checks() -> None:
    seq = Sequencer("client-00", "run1")
    v = validator(known_sender=lambda s: s == "client-00", round_ok=lambda e: e.round == 0)
    v.check(encode(smashed(seq)))
    replay = smashed(seq)
    v.check(encode(replay))
    with pytest.raises(WireError, match="replayed"):
        v.check(encode(replay))
    nan = np.full((2, *SHAPE), np.nan, dtype=np.float32)
    with pytest.raises(WireError, match="non-finite"):
        v.check(encode(smashed(seq, nan)))
    with pytest.raises(WireError, match="shape"):
        v.check(encode(smashed(seq, np.zeros((2, 4, 3, 6), np.float32))))
    with pytest.raises(WireError, match="dtype"):
        v.check(encode(smashed(seq, labels=np.array([1.0, 2.0]))))
    with pytest.raises(WireError, match="batch size"):
        v.check(encode(smashed(seq, labels=np.array([1, 2, 3]))))
    with pytest.raises(WireError, match="current round"):
        v.check(encode(smashed(seq, round=3)))
    with pytest.raises(WireError, match="unknown client"):
        v.check(encode(smashed(Sequencer("intruder", "run1"))))
    with pytest.raises(WireError, match="current run"):
        v.check(encode(smashed(Sequencer("client-00", "other"))))


def test_oversized_message_rejected_before_parsing() -> None:
    with pytest.raises(WireError, match="exceeds"):
        validator().check(b"\0" * (MAX_MESSAGE_BYTES + 1))


@pytest.mark.parametrize(
    ("compression", "ratio", "tol"), [("fp16", 1.95, 4e-3), ("int8", 3.5, 0.02)]
)
def test_activation_compression(compression: str, ratio: float, tol: float) -> None:
    x = np.maximum(np.random.default_rng(1).normal(size=(32, 16, 12, 24)), 0).astype(np.float32)
    full = encode(Sequencer("c", "r").make(MsgType.SMASHED, 0, {}, pack_activations(x, "fp32")))
    packed = pack_activations(x, compression)  # type: ignore[arg-type]
    small = encode(Sequencer("c", "r").make(MsgType.SMASHED, 0, {}, packed))
    assert len(full) / len(small) >= ratio
    err = np.abs(unpack_activations(packed) - x).max() / x.max()
    assert err < tol


# ---- limits checked before parsing (issue 8) ---------------------------------------------------


def _raw(envelope: str | dict, tensors: dict | None = None, data: bytes = b"") -> bytes:  # type: ignore[type-arg]
    env = envelope if isinstance(envelope, str) else json.dumps(envelope)
    header = json.dumps({"__metadata__": {"envelope": env}, **(tensors or {})}).encode()
    return struct.pack("<Q", len(header)) + header + data


def _env(**over: object) -> dict:  # type: ignore[type-arg]
    env = Sequencer("client-00", "run1").make(MsgType.SMASHED, 0, {"step": 0}).env
    return {**env.model_dump(mode="json"), **over}


def _act(offsets: tuple[int, int] = (0, 4 * 2 * 60), **over: object) -> dict:  # type: ignore[type-arg]
    return {"dtype": "F32", "shape": [2, *SHAPE], "data_offsets": list(offsets), **over}


def _reason(data: bytes) -> str:
    with pytest.raises(WireError) as e:
        read_header(data)
    return e.value.reason


def test_deep_nesting_in_the_header_is_a_rejection_not_a_recursion_error() -> None:
    body = b"[" * 200_000  # the 200 KB message that used to make `aggregator serve` exit 1
    assert _reason(struct.pack("<Q", len(body)) + body) == "header_depth"
    nested = b'{"__metadata__":{"envelope":"{}"},"x":' + b"[" * 13 + b"]" * 13 + b"}"
    assert _reason(struct.pack("<Q", len(nested)) + nested) == "header_depth"
    # brackets inside strings do not count
    ok = _raw(_env(body={"step": 0, "note": "[" * 3000}))
    assert read_header(ok)[0].body["note"] == "[" * 3000


def test_deep_nesting_in_the_envelope_body() -> None:
    env = json.dumps(_env())[:-2] + ', "x": ' + "[" * 100 + "]" * 100 + "}}"
    assert _reason(_raw(env)) == "envelope_depth"
    env = json.dumps(_env())[:-2] + ', "x": ' + "[" * 10 + "]" * 10 + "}}"
    assert read_header(_raw(env))[0].body["x"] == [[[[[[[[[[]]]]]]]]]]


@pytest.mark.parametrize(
    "over",
    [
        {"round": 2**64},
        {"seq": 10**30},
        {"created_at": -(2**63) - 1},
        {"ttl": 2**70},
        {"schema_version": 2**63},
        {"body": {"step": 2**64}},
        {"body": {"confusion": [[2**80] * 7] * 7}},
    ],
)
def test_integers_beyond_int64_are_refused_when_parsed(over: dict) -> None:  # type: ignore[type-arg]
    assert _reason(_raw(_env(**over))) == "int_too_large"


def test_long_number_literals_strings_and_names() -> None:
    env = json.dumps(_env()).replace('"step": 0', '"step": ' + "9" * 5000)
    assert _reason(_raw(env)) == "int_too_large"
    assert _reason(_raw(_env(src="x" * 5000))) == "string_too_long"
    assert _reason(_raw(_env(body={"reason": "x" * 5000}))) == "string_too_long"
    entry = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    assert _reason(_raw(_env(), {"n" * 300: entry}, b"\0")) == "string_too_long"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_json_numbers(literal: str) -> None:
    env = json.dumps(_env(ttl=0.5)).replace('"ttl": 0.5', f'"ttl": {literal}')
    assert _reason(_raw(env)) == "non_finite_json"


def test_shape_products_and_tensor_bytes() -> None:
    for shape in ([2**40, 2**40], [2**31] * 4, [2**62, 4], [2**21] * 8):
        assert _reason(_raw(_env(), {"activations": _act(shape=shape)})) == "shape_too_large"
    assert _reason(_raw(_env(), {"activations": _act(shape=[1] * 9)})) == "bad_shape"
    assert _reason(_raw(_env(), {"activations": _act(shape=[2, -1])})) == "bad_shape"
    assert _reason(_raw(_env(), {"activations": _act(shape=[2, True])})) == "bad_shape"
    n = 4 * 2 * 60
    assert read_header(_raw(_env(), {"activations": _act()}, bytes(n)))[1] == {
        "activations": ("F32", (2, *SHAPE))
    }
    bad = [
        _raw(_env(), {"activations": _act((0, n - 4))}, bytes(n - 4)),  # fewer bytes than shape
        _raw(_env(), {"activations": _act()}, bytes(n + 1)),  # bytes left over
        _raw(_env(), {"activations": _act((4, n + 4))}, bytes(n)),  # past the end
        _raw(_env(), {"activations": _act((n, 0))}, bytes(n)),  # backwards
        _raw(  # two tensors on the same bytes
            _env(),
            {
                "activations": _act(),
                "labels": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
            },
            bytes(n),
        ),
        _raw(_env(), {"activations": _act(("0", n))}, bytes(n)),  # not integers
    ]
    assert [_reason(d) for d in bad] == ["tensor_bytes"] * len(bad)


def test_tensor_count_dtype_and_entry_shape() -> None:
    k = MAX_TENSORS + 1
    many = {f"t{j}": {"dtype": "U8", "shape": [1], "data_offsets": [j, j + 1]} for j in range(k)}
    assert _reason(_raw(_env(), many, bytes(k))) == "too_many_tensors"
    assert _reason(_raw(_env(), {"a": _act(dtype="F128")})) == "unsupported_dtype"
    assert _reason(_raw(_env(), {"a": {"dtype": "F32", "shape": [1]}})) == "tensor_spec"
    assert _reason(_raw(_env(), {"a": [1, 2]})) == "tensor_spec"


def test_header_framing_and_metadata() -> None:
    good = encode(smashed(Sequencer("c", "run1")))
    (n,) = struct.unpack("<Q", good[:8])
    assert _reason(b"\0" * 7) == "short"
    assert _reason(struct.pack("<Q", len(good)) + good[8:]) == "header_length"
    assert _reason(struct.pack("<Q", 2**64 - 1) + good[8:]) == "header_length"
    assert _reason(struct.pack("<Q", n - 3) + good[8:]) == "header_json"
    assert _reason(struct.pack("<Q", 2) + b"[]") == "header_json"
    assert _reason(struct.pack("<Q", 2) + b"\xff\xfe") == "header_json"
    header = json.dumps({"__metadata__": {"envelope": "{}", "x": "y"}}).encode()
    assert _reason(struct.pack("<Q", len(header)) + header) == "bad_metadata"
    assert _reason(_raw("{}")) == "bad_envelope"
    assert _reason(_raw(_env(round=-1))) == "bad_envelope"
    assert _reason(_raw(_env(schema_version=2))) == "schema_version"
    assert _reason(b"\0" * (MAX_MESSAGE_BYTES + 1)) == "oversized"


def test_no_exception_but_wire_error_escapes_the_parser() -> None:
    """Bit flips, truncations and splices of valid messages: only WireError, whatever breaks."""
    rng = np.random.default_rng(0)
    seq = Sequencer("client-00", "run1")
    base = [encode(smashed(seq)), _raw(_env(body={"confusion": [[1] * 7] * 7}))]
    outcomes = set()
    for i in range(3000):
        data = bytearray(base[i % 2])
        if i % 3 == 0:
            data = data[: int(rng.integers(len(data)))]
        else:
            end = 8 + struct.unpack("<Q", bytes(data[:8]))[0] if i % 3 == 1 else len(data)
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(min(end, len(data))))] ^= 1 << int(rng.integers(8))
        try:
            read_header(bytes(data))
            decode(bytes(data))
            outcomes.add("ok")
        except WireError as e:
            outcomes.add(e.reason)
    assert len(outcomes) >= 5, outcomes  # many different reasons, and nothing else raised


def test_validator_catches_every_exception_and_names_the_reason() -> None:
    def broken(env: object) -> dict:  # type: ignore[type-arg]
        raise ZeroDivisionError("a spec built from a hostile body")

    v = Validator("run1", {MsgType.SMASHED: broken})  # type: ignore[dict-item]
    with pytest.raises(WireError) as e:
        v.check(encode(smashed(Sequencer("c", "run1"))))
    assert e.value.reason == "bad_body"
    seq = Sequencer("client-00", "run1")
    with pytest.raises(WireError) as e:
        validator().check(encode(smashed(seq)), sender="client-01")
    assert e.value.reason == "spoofed_sender"
    old = smashed(seq)
    old.env.ttl, old.env.created_at = 1.0, old.env.created_at - 10
    with pytest.raises(WireError) as e:
        validator().check(encode(old))
    assert e.value.reason == "expired"


def test_body_integers_are_bounded() -> None:
    seq = Sequencer("client-00", "run1")

    def result(conf: list[list[int]]) -> Message:
        return decode(
            encode(seq.make(MsgType.EVAL_RESULT, 0, {"split": "test", "confusion": conf}))
        )

    ok = check_body(result([[1] * 7] * 7))
    assert ok.confusion[0][0] == 1  # type: ignore[attr-defined]
    for bad in ([[10**12] * 7] * 7, [[-1] * 7] * 7, [[1] * 6] * 7, [[1] * 7] * 6):
        with pytest.raises(WireError) as e:
            check_body(result(bad))
        assert e.value.reason == "bad_body"
    for typ, body in [
        (MsgType.SMASHED, {"step": 10**9}),
        (MsgType.CLIENT_UPDATE, {"n_samples": 1, "steps": 10**15, "seen": 1}),
        (MsgType.CLIENT_UPDATE, {"n_samples": 1, "steps": 1, "seen": 1, "correct": -1}),
        (MsgType.EVAL_SMASHED, {"split": "test", "step": 0, "steps": 10**12}),
        (MsgType.PREDICT, {"frame": -1}),
    ]:
        with pytest.raises(WireError, match="body"):
            check_body(decode(encode(seq.make(typ, 0, body))))


# ---- the replay window -------------------------------------------------------------------------


def _joins(n: int) -> list[bytes]:
    seq = Sequencer("client-00", "run1")
    return [encode(seq.make(MsgType.JOIN, 0, {})) for _ in range(n)]


def test_replay_window_forgets_the_oldest_ids_one_by_one() -> None:
    v = Validator("run1", {MsgType.JOIN: {}}, replay_window=3)
    joins = _joins(6)
    ids = [decode(j).env.message_id for j in joins]
    for j in joins[:3]:
        v.check(j)
    with pytest.raises(WireError, match="replayed"):
        v.check(joins[0])  # a JOIN is caught by its id, not its sequence number
    v.check(joins[3])  # a fourth id pushes out only the first
    assert [v.seen(i) for i in ids[:4]] == [False, True, True, True]
    for j in joins[4:]:
        v.check(j)
    assert [v.seen(i) for i in ids] == [False, False, False, True, True, True]
    for j in joins[3:]:
        with pytest.raises(WireError) as e:
            v.check(j)
        assert e.value.reason == "replay"


def test_replay_window_forgets_by_age_gradually() -> None:
    now = [0.0]
    v = Validator("run1", {MsgType.JOIN: {}}, replay_seconds=60, clock=lambda: now[0])
    joins = _joins(3)
    ids = [decode(j).env.message_id for j in joins]
    for t, j in zip((0.0, 30.0, 50.0), joins, strict=True):
        now[0] = t
        v.check(j)
    now[0] = 70.0  # only the first is older than 60 s
    assert [v.seen(i) for i in ids] == [False, True, True]
    now[0] = 95.0
    assert [v.seen(i) for i in ids] == [False, False, True]


# ---- rejection accounting ------------------------------------------------------------------------


def test_reject_log_counts_every_rejection_and_logs_a_line_per_reason_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    rl = RejectLog(logging.getLogger("test.rejects"), "tester", interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.rejects"):
        logged = [rl.reject("replay", "detail", "c0") for _ in range(1000)]
        rl.reject("header_depth", "deep", "c1")
        now[0] = 11.0
        rl.reject("replay", "again", "c0")
    assert rl.counts == {"replay": 1001, "header_depth": 1}
    assert sum(logged) == 1 and rl.total == 1002
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "999 more [replay]" in lines[2]
