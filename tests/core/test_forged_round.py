"""A forged message of a far round that fails its checks leaves the device as it was.

The round check used to move the device's newest round on before the message's other checks
ran: one forged FEATURES under the aggregator's id, of round 999,999 and with a NaN, made every
real message of the current round look stale, and the device never trained again.
"""

from __future__ import annotations

import numpy as np

from splitfed.algorithms.sflv1 import SFLV1
from splitfed.client import ClientRuntime
from splitfed.config import TrainConfig
from splitfed.data.partition import client_shards
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig, feature_dim
from splitfed.wire import MsgType, Sequencer, encode


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
