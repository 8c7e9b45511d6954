"""The wire protocol: round trips, and every kind of bad message rejected with a reason."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from splitfed.wire import (
    MAX_MESSAGE_BYTES,
    Message,
    MsgType,
    Sequencer,
    Validator,
    WireError,
    activation_spec,
    decode,
    encode,
    pack_activations,
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
        (lambda d: d[:-7], "corrupt"),
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
