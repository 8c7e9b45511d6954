"""The arithmetic of aggregation, as pure functions tested on their own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg: the sample-weighted mean of each tensor.

    Float tensors are averaged in float64 and cast back; integer buffers (BatchNorm's batch
    counter) take the weighted mean rounded, which keeps them meaningful.
    """
    if not states:
        raise ValueError("nothing to average")
    if len(states) != len(weights):
        raise ValueError("one weight per state")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    keys = list(states[0])
    for s in states[1:]:
        if set(s) != set(keys):
            raise ValueError("states have different keys")
    out: dict[str, np.ndarray] = {}
    for k in keys:
        ref = np.asarray(states[0][k])
        acc = sum(wi * np.asarray(s[k], dtype=np.float64) for wi, s in zip(w, states))
        acc = np.asarray(acc)
        out[k] = np.rint(acc).astype(ref.dtype) if ref.dtype.kind in "iu" else acc.astype(ref.dtype)
    return out


def interleaved_order(batch_counts: Sequence[int], rng: np.random.Generator) -> list[int]:
    """SFLV2's schedule: every client's batches, shuffled together, each client's kept in order.

    Returns a list of client positions, one entry per batch; a client with k batches appears
    k times. With a single client this is simply its batches in order.
    """
    order = np.repeat(np.arange(len(batch_counts)), np.asarray(batch_counts, dtype=np.int64))
    return rng.permutation(order).tolist()
