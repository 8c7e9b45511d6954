"""Hostile messages on an agent's `down` topic, and the reasons an agent counts them under."""

from __future__ import annotations

import struct

import numpy as np

from splitfed.wire import MsgType

from .base import (
    AGGREGATOR,
    Batch,
    Sender,
    Target,
    activations,
    feature_grad,
    forged_aggregator,
    huge_int,
    other_run_target,
    raw,
)

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
    other = Sender(other_run_target(t), AGGREGATOR)
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
            env = stranger.env(MsgType.GRADIENTS, step=huge_int(rng), loss=1.0)
            msg = raw(env)
        b.hostile.append((t.down(client_id), msg))
    b.hostile += agent_u_junk(t, rng, max(n // 4, 2), client_id).hostile
    return b


def agent_u_junk(t: Target, rng: np.random.Generator, n: int, client_id: str) -> Batch:
    """The U-shape's messages on an agent's `down` topic, under the aggregator's id.

    FEATURE_GRADS (only the aggregator takes them), and FEATURES: of a standard run (no head
    on the device), or in a U-shaped run of a far round with the wrong width, dtype or NaN.
    """
    b = Batch()
    f = max(t.features, 1)
    for i in range(n):
        fake = forged_aggregator(t, i)
        kind = i % 4
        rnd = int(rng.integers(1000, 1_000_000))  # a far round: it must not move the agent on
        if kind == 0:
            msg = fake.msg(MsgType.FEATURE_GRADS, {"grad": feature_grad(t, rng)}, round=rnd, step=0)
        elif kind == 1:
            feats = rng.standard_normal((1, f + 1 if t.features else f)).astype(np.float32)
            msg = fake.msg(MsgType.FEATURES, {"features": feats}, round=rnd, step=0)
        elif kind == 2:
            feats = feature_grad(t, rng, dtype=np.float64 if t.features else np.float32)
            msg = fake.msg(MsgType.FEATURES, {"features": feats}, round=rnd, step=0)
        else:
            feats = feature_grad(t, rng)
            feats.flat[int(rng.integers(feats.size))] = np.nan
            msg = fake.msg(MsgType.FEATURES, {"features": feats}, round=rnd, step=0)
        b.hostile.append((t.down(client_id), msg))
    return b
