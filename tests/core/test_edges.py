"""The edges where a peer's bytes enter a process: nothing they contain may raise past them."""

from __future__ import annotations

import struct

import numpy as np

from splitfed.config import TrainConfig
from splitfed.device import DeviceRuntime
from splitfed.model import ModelConfig
from splitfed.server import ServerIO
from splitfed.transport import Incoming, InProcessTransport
from splitfed.wire import Message, MsgType, Sequencer, Validator, encode


def _io() -> ServerIO:
    return ServerIO(InProcessTransport([]), "run1", ModelConfig(), TrainConfig())


def _join(seq: Sequencer, client_id: str | None = None) -> bytes:
    body = {"client_id": client_id or seq.src, "n_train": 5, "n_test": 1,
            "class_counts": [1, 1, 1, 1, 1, 0, 0], "input_shape": [1, 48, 96]}  # fmt: skip
    return encode(seq.make(MsgType.JOIN, 0, body))


def test_server_edge_counts_hostile_messages_by_reason_and_never_raises() -> None:
    io = _io()
    seq = Sequencer("client-00", "run1")
    assert isinstance(io._accept(Incoming("client-00", data=_join(seq))), Message)
    deep = b"[" * 200_000
    conf = [[0] * 7 for _ in range(7)]
    conf[0][0] = 2**70  # beyond int64: an OverflowError in the aggregation, before issue 8
    result = encode(seq.make(MsgType.EVAL_RESULT, 0, {"split": "test", "confusion": conf}))
    hostile = [
        Incoming("client-00", data=struct.pack("<Q", len(deep)) + deep),
        Incoming("client-00", data=result),
        Incoming("client-00", data=_join(Sequencer("client-00", "run1"), "client-01")),
        Incoming("client-01", data=encode(seq.make(MsgType.LEAVE, 0, {}))),
        Incoming("client-00", data=None),
    ]  # fmt: skip
    assert [io._accept(ev) for ev in hostile] == [None] * len(hostile)
    assert io.rejected == {
        "header_depth": 1,
        "int_too_large": 1,
        "spoofed_sender": 2,
        "empty_event": 1,
    }
    assert sorted(io.clients) == ["client-00"]


def test_server_hands_the_round_logic_checked_typed_bodies() -> None:
    io = _io()
    seq = Sequencer("client-00", "run1")
    io._accept(Incoming("client-00", data=_join(seq)))
    body = {"n_samples": "7", "steps": 1.0, "seen": 3, "extra": "kept"}
    msg = seq.make(MsgType.CLIENT_UPDATE, 0, body, {})
    out = io._accept(Incoming("client-00", data=encode(msg)))
    # the client update lacks its weights: rejected, not passed on half-checked
    assert out is None and io.rejected["tensor_names"] == 1
    msg = seq.make(MsgType.EVAL_RESULT, 0, {"split": "test", "confusion": [["1"] * 7] * 7})
    out = io._accept(Incoming("client-00", data=encode(msg)))
    assert isinstance(out, Message)
    assert out.env.body["confusion"][0] == [1] * 7  # ints, as the body model made them


class _Device(DeviceRuntime):
    """The smallest runtime: it fails on every message in a chosen way."""

    def __init__(self, error: Exception) -> None:
        self.client_id = "client-00"
        self.seq = Sequencer("client-00", "run1")
        self.rejected = 0
        self.error = error
        self._validator = Validator(
            "run1", {MsgType.GRADIENTS: {}}, known_sender=lambda s: s == "aggregator"
        )

    def join(self) -> bytes:
        return b""

    def handle(self, msg: Message) -> list[Message]:
        raise self.error


def test_device_edge_turns_any_exception_into_a_counted_rejection() -> None:
    agg = Sequencer("aggregator", "run1")
    for error, reason in [
        (OverflowError("int too large"), "handler_error"),
        (KeyError("step"), "semantic"),
        (MemoryError(), "handler_error"),
    ]:
        device = _Device(error)
        assert device.handle_bytes(encode(agg.make(MsgType.GRADIENTS, 0, {}))) == []
        assert device.rejected == 1 and device.rejected_by_reason == {reason: 1}
    device = _Device(ValueError())
    deep = b"{" * 100_000
    assert device.handle_bytes(struct.pack("<Q", len(deep)) + deep) == []
    assert device.handle_bytes(np.zeros(3, np.uint8).tobytes()) == []
    assert device.rejected_by_reason == {"header_depth": 1, "short": 1}
