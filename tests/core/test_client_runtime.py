"""The device runtime: nothing but smashed data leaves it, and bad input does not crash it."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from splitfed.algorithms.sflv1 import SFLV1
from splitfed.client import ClientRuntime
from splitfed.config import TrainConfig
from splitfed.data.partition import client_shards
from splitfed.model import BlurPool, ModelConfig, smashed_shape
from splitfed.server import ServerIO
from splitfed.transport import InProcessTransport
from splitfed.wire import MsgType, Sequencer, decode, encode


class TapTransport(InProcessTransport):
    """Records every message in both directions."""

    def __init__(self, clients: list[ClientRuntime]) -> None:
        self.log: list[bytes] = []
        super().__init__(clients)

    def _from_client(self, client_id: str, data: bytes) -> None:
        self.log.append(data)
        super()._from_client(client_id, data)

    def send(self, client_id: str, data: bytes) -> None:
        self.log.append(data)
        super().send(client_id, data)


def test_only_declared_tensors_cross_the_wire(small_synth) -> None:
    _, _, shards = client_shards(small_synth, 2, seed=0)
    clients = [ClientRuntime(f"client-{i:02d}", "r", tr, te) for i, (tr, te) in enumerate(shards)]
    tap = TapTransport(clients)
    model, train = ModelConfig(widths=(8, 16, 16), cut=1), TrainConfig(batch_size=16)
    io = ServerIO(tap, "r", model, train)
    algo = SFLV1(model, train, 0)
    io.wait_for_clients(2, 1)
    algo.enrol(io.online())
    algo.run_round(io, 0, io.online(), 60)
    algo.evaluate(io, io.online(), "test", 60)
    image_shape = small_synth.images.shape[1:]
    act = smashed_shape(model)
    seen = set()
    for data in tap.log:
        msg = decode(data)
        seen.add(msg.type)
        for name, t in msg.tensors.items():
            assert t.shape[1:] != image_shape, f"{msg.type} carries an image-shaped tensor {name}"
            if name == "activations":
                assert t.shape[1:] == act
    assert {
        MsgType.SMASHED,
        MsgType.GRADIENTS,
        MsgType.CLIENT_UPDATE,
        MsgType.EVAL_SMASHED,
        MsgType.EVAL_RESULT,
    } <= seen
    # Evaluation results are counts only: no labels travel in EVAL_SMASHED.
    assert all(
        "labels" not in decode(d).tensors for d in tap.log if decode(d).type is MsgType.EVAL_SMASHED
    )


def test_bad_messages_are_dropped_not_raised(small_synth) -> None:
    client = ClientRuntime("client-00", "r", small_synth)
    agg = Sequencer("aggregator", "r")
    bad = [
        b"",
        b"garbage" * 10,
        encode(
            agg.make(
                MsgType.GRADIENTS, 0, {"step": 0}, {"grad": np.zeros((2, 8, 24, 48), np.float32)}
            )
        ),
        encode(Sequencer("stranger", "r").make(MsgType.ROUND_START, 0, {})),
        encode(agg.make(MsgType.ROUND_START, 0, {"model": {"cut": 99}})),
        encode(
            agg.make(
                MsgType.EVAL_PREDICTIONS,
                0,
                {"split": "test", "step": 3},
                {"pred": np.zeros(2, np.int64)},
            )
        ),
    ]
    for data in bad:
        assert client.handle_bytes(data) == []
    assert client.rejected == len(bad)


def test_cut_round_parts_cover_the_round_and_survive_a_restart(small_synth) -> None:
    """`syncs_per_round`: the parts of a round are its batches in order, each once; a device
    that restarts mid-round (no stream kept) draws the same pixels for the part it is given."""
    from splitfed.data.batches import iterate_batches

    train = TrainConfig(batch_size=16, syncs_per_round=3)
    key = (5, 2, 1)
    whole = list(iterate_batches(small_synth, 16, key, 1, jitter=train.jitter))
    device = ClientRuntime("client-00", "r", small_synth)
    device.train_cfg = train
    parts = []
    for part in range(3):
        batches, first = device._part_batches(key, part)
        assert first == sum(len(p) for p in parts)  # the round's step numbers go on
        parts.append(list(batches))
    flat = [b for p in parts for b in p]
    assert len(flat) == len(whole) and min(len(p) for p in parts) >= 1
    for (x, y), (wx, wy) in zip(flat, whole, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    restarted = ClientRuntime("client-00", "r", small_synth)
    restarted.train_cfg = train
    batches, first = restarted._part_batches(key, 2)
    assert first == len(parts[0]) + len(parts[1])
    for (x, _), (px, _) in zip(list(batches), parts[2], strict=True):
        assert torch.equal(x, px)


@pytest.mark.parametrize(
    ("section", "field", "bad_values", "antialias"),
    [
        ("train", "syncs_per_round", (0, 65, 10**12, -1, 4.5, None), False),
        ("model", "antialias", (2, -1, None, "maybe", [True], {"on": True}), True),
    ],
)
def test_a_round_start_with_a_field_out_of_bounds_is_refused(
    small_synth, section: str, field: str, bad_values: tuple[Any, ...], antialias: bool
) -> None:
    """Settings arrive in ROUND_START's body (`train.syncs_per_round`, `model.antialias`): a
    value out of bounds or of the wrong kind refuses the round, counted, and the device starts
    nothing; the body as sent starts a round with the half it describes."""
    model = ModelConfig(widths=(8, 16, 16), cut=1, antialias=antialias)
    algo = SFLV1(model, TrainConfig(batch_size=16), 0)
    body = algo.round_body("client-00")
    agg = Sequencer("aggregator", "r")
    client = ClientRuntime("client-00", "r", small_synth)
    for rnd, bad in enumerate(bad_values):
        hostile = copy.deepcopy(body)
        hostile[section][field] = bad
        msg = agg.make(MsgType.ROUND_START, rnd, hostile, algo.global_tensors())
        assert client.handle_bytes(encode(msg)) == []
        assert client.rejected == rnd + 1 and client.round is None
    # The same body within bounds starts a round: the refusals were the field's.
    ok = agg.make(MsgType.ROUND_START, 5, body, algo.global_tensors())
    assert [m.type for m in client.handle(ok)] == [MsgType.SMASHED]
    assert client.client_net is not None
    blurred = any(isinstance(m, BlurPool) for m in client.client_net.modules())
    assert blurred is antialias
