"""A forged message of a far round that fails its checks leaves the device as it was.

The round check used to move the device's newest round on before the message's other checks
ran: one forged FEATURES under the aggregator's id, of round 999,999 and with a NaN, made every
real message of the current round look stale, and the device never trained again.
"""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.algorithms.fedsl.model import PREFIX, SeqModelConfig, build_seq_model
from splitfed.algorithms.sflv1 import SFLV1
from splitfed.client import ClientRuntime
from splitfed.config import TrainConfig
from splitfed.data.partition import client_shards
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.data.vertical import OwnerTable
from splitfed.devices.owner import OwnerRuntime
from splitfed.devices.segment import SegmentRuntime
from splitfed.model import ModelConfig, feature_dim
from splitfed.psi import encode_ids
from splitfed.training import prefixed, state_to_numpy
from splitfed.wire import MsgType, Sequencer, decode, encode


def test_a_refused_far_round_does_not_make_the_real_round_stale() -> None:
    _, _, shards = client_shards(generate_synth(SynthConfig(identities=4)), 1, None, None, 0)
    runtime = ClientRuntime("client-00", "run", *shards[0])
    model = ModelConfig(shape="u")
    algo = SFLV1(model, TrainConfig(), 0)
    real = Sequencer("aggregator", "run")
    start = real.make(MsgType.ROUND_START, 0, algo.round_body("client-00"), algo.global_tensors())
    assert runtime.handle_bytes(encode(start)) and runtime.rejected == 0

    forged = Sequencer("aggregator", "run")
    forged.seq = 2**62  # far ahead of the real one, so the replay check lets it through
    features = np.zeros((1, feature_dim(model)), np.float32)
    features[0, 0] = np.nan
    msg = forged.make(MsgType.FEATURES, 999_999, {"step": 0}, {"features": features})
    assert runtime.handle_bytes(encode(msg)) == []
    assert runtime.rejected_by_reason["non_finite"] == 1

    weights = real.make(MsgType.GLOBAL_WEIGHTS, 0, algo.round_body("client-00"),
                        algo.global_tensors())  # fmt: skip
    runtime.handle_bytes(encode(weights))
    assert runtime.rejected == 1, runtime.rejected_by_reason  # the real one was taken
    assert runtime.rejected_by_reason["other_round"] == 0


# ---- the same attack on the other device runtimes -------------------------------------------
#
# `DeviceRuntime` checks the round for all of them. The round check runs after the sender,
# type and replay checks, so only a check that runs after it (the body, tensor names, shapes,
# finite values) can refuse a forged message once its round has been looked at.


def forger() -> Sequencer:
    """The aggregator's id with a sequence far ahead of the real one: only a later check can
    refuse what it sends."""
    s = Sequencer("aggregator", "run")
    s.seq = 2**62
    return s


def owner() -> OwnerRuntime:
    ids = np.asarray(["r1", "r2", "r3"])
    table = OwnerTable("o0", ids, np.zeros((3, 1, 24, 24), np.uint8), (0, 24, 0, 24))
    return OwnerRuntime("owner-0", "run", table)


def align(seq: Sequencer, rnd: int, train_bytes: int | None = None) -> bytes:
    """A PyVertical alignment (ROUND_START, phase align); `train_bytes` may lie about a length."""
    train, test = encode_ids(["r1", "r2"]), encode_ids(["r3"])
    body = {
        "phase": "align",
        "train_ids_bytes": len(train) if train_bytes is None else train_bytes,
        "test_ids_bytes": len(test),
    }
    return encode(seq.make(MsgType.ROUND_START, rnd, body, {"train_ids": train, "test_ids": test}))


OWNER_FORGERIES = {
    "bad_body": lambda s: encode(s.make(MsgType.ROUND_START, 999_999, {"phase": "nonsense"})),
    "wrong_shape": lambda s: align(s, 999_999, train_bytes=1),
    "bad_body_gradients": lambda s: encode(  # gradients before training: the spec refuses
        s.make(MsgType.GRADIENTS, 999_999, {"step": 0}, {"grad": np.zeros((1, 1), np.float32)})
    ),
}


@pytest.mark.parametrize("reason", sorted(OWNER_FORGERIES))
def test_owner_a_refused_far_round_does_not_make_the_real_round_stale(reason: str) -> None:
    device, real = owner(), Sequencer("aggregator", "run")
    assert device.handle_bytes(OWNER_FORGERIES[reason](forger())) == []
    assert device.rejected == 1
    assert device.rejected_by_reason[reason.removesuffix("_gradients")] == 1

    (reply,) = device.handle_bytes(align(real, 0))  # the real round 0 goes on
    assert decode(reply).type is MsgType.CLIENT_UPDATE
    assert device.rejected == 1, device.rejected_by_reason
    assert device.aligned is not None and device.aligned.ids["test"] == ["r3"]


def test_owner_an_accepted_round_still_makes_older_ones_stale() -> None:
    device, real = owner(), Sequencer("aggregator", "run")
    assert device.handle_bytes(align(real, 1))
    assert device.handle_bytes(align(real, 0)) == []
    assert device.rejected_by_reason["other_round"] == 1


SEQ_MODEL = SeqModelConfig(
    frame_shape=(1, 24, 48), frames=4, segments=2, widths=(4, 8), features=16, hidden=8
)


def segment() -> SegmentRuntime:
    """The first of two segments: two frames of each of four clips."""
    frames = np.zeros((4, 2, 1, 24, 48), np.uint8)
    return SegmentRuntime("segment-0-0", "run", 0, 0, frames, frames[:2])


def seg_start(seq: Sequencer, rnd: int, weights: dict[str, np.ndarray] | None = None) -> bytes:
    body = {
        "seed": 0,
        "group": 0,
        "segment": 0,
        "model": SEQ_MODEL.model_dump(mode="json"),
        "train": TrainConfig(batch_size=2).model_dump(mode="json"),
    }
    if weights is None:
        weights = prefixed(state_to_numpy(build_seq_model(SEQ_MODEL, 0)[0]), PREFIX)
    return encode(seq.make(MsgType.ROUND_START, rnd, body, weights))


def _nan_weights() -> dict[str, np.ndarray]:
    w = prefixed(state_to_numpy(build_seq_model(SEQ_MODEL, 0)[0]), PREFIX)
    name = next(k for k, v in w.items() if v.dtype.kind == "f")
    w[name] = np.full_like(w[name], np.nan)
    return w


SEGMENT_FORGERIES = {
    "non_finite": lambda s: seg_start(s, 999_999, _nan_weights()),
    "tensor_names": lambda s: seg_start(s, 999_999, {"w.nothing": np.zeros(1, np.float32)}),
    "bad_body": lambda s: encode(  # hidden state before any model: the spec refuses
        s.make(MsgType.SMASHED, 999_999, {"step": 0}, {"hidden": np.zeros((1, 8), np.float32)})
    ),
}


@pytest.mark.parametrize("reason", sorted(SEGMENT_FORGERIES))
def test_segment_a_refused_far_round_does_not_make_the_real_round_stale(reason: str) -> None:
    device, real = segment(), Sequencer("aggregator", "run")
    assert device.handle_bytes(SEGMENT_FORGERIES[reason](forger())) == []
    assert device.rejected == 1
    assert device.rejected_by_reason[reason] == 1

    (reply,) = device.handle_bytes(seg_start(real, 0))  # the real round 0 goes on
    assert decode(reply).type is MsgType.SMASHED
    assert device.rejected == 1, device.rejected_by_reason
    assert device.round is not None and device.round.round == 0


def test_segment_an_accepted_round_still_makes_older_ones_stale() -> None:
    device, real = segment(), Sequencer("aggregator", "run")
    assert device.handle_bytes(seg_start(real, 1))
    assert device.handle_bytes(seg_start(real, 0)) == []
    assert device.rejected_by_reason["other_round"] == 1
