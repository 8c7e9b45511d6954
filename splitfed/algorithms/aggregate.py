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


def sequential_order(batch_counts: Sequence[int], rng: np.random.Generator) -> list[int]:
    """SFLV2 as the SplitFed paper describes it: clients served one after another, in a random
    order drawn each round, each with all of its batches."""
    return [int(i) for i in rng.permutation(len(batch_counts)) for _ in range(batch_counts[i])]


def lockstep_order(batch_counts: Sequence[int], rng: np.random.Generator) -> list[list[int]]:
    """SFLV2 in lockstep: the clients' i-th batches form group i, in a random order per group.

    Returns the groups, one per batch index; a client with k batches is in the first k. The
    server steps once per group (`splitfed.algorithms.sflv2`), as centralized training steps
    once on the batch the devices share. With a single client every group is one batch.
    """
    most = max(batch_counts, default=0)
    return [
        [int(c) for c in rng.permutation(len(batch_counts)) if batch_counts[c] > i]
        for i in range(most)
    ]


def max_samples(trained: int, local_epochs: int, batch_size: int) -> int:
    """The largest training-set size consistent with `trained` samples seen in batches.

    A device with n samples shows local_epochs x n of them in a round, less a dropped final
    batch of one per epoch (BatchNorm needs two); so n is at most trained / epochs, plus one
    when that is a whole number of batches.
    """
    per_epoch = trained // max(local_epochs, 1)
    return per_epoch + 1 if per_epoch % batch_size == 0 else per_epoch


def _cast(acc: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.rint(acc).astype(ref.dtype) if ref.dtype.kind in "iu" else acc.astype(ref.dtype)


def _stack(states: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not states:
        raise ValueError("nothing to aggregate")
    keys = list(states[0])
    for s in states[1:]:
        if set(s) != set(keys):
            raise ValueError("states have different keys")
    return {k: np.stack([np.asarray(s[k], dtype=np.float64) for s in states]) for k in keys}


def coordinate_median(states: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The median of every value over the copies (unweighted): robust to a minority of
    arbitrary copies, whatever their scale."""
    stacked = _stack(states)
    return {k: _cast(np.median(v, axis=0), np.asarray(states[0][k])) for k, v in stacked.items()}


def trimmed_mean(states: Sequence[Mapping[str, np.ndarray]], trim: float) -> dict[str, np.ndarray]:
    """Per value, the mean after cutting the `trim` share of copies at each end (at least one
    copy stays); trim 0 is the unweighted mean."""
    if not 0 <= trim < 0.5:
        raise ValueError("trim must be in [0, 0.5)")
    stacked = _stack(states)
    n = len(states)
    k = min(int(np.floor(trim * n)), (n - 1) // 2)
    out: dict[str, np.ndarray] = {}
    for key, v in stacked.items():
        kept = np.sort(v, axis=0)[k : n - k]
        out[key] = _cast(kept.mean(axis=0), np.asarray(states[0][key]))
    return out


def clip_update(
    state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_norm: float
) -> dict[str, np.ndarray]:
    """`state` moved back towards `reference` so that their float difference has an L2 norm of
    at most `max_norm` (integer buffers are kept as they are)."""
    if max_norm <= 0:
        raise ValueError("max_norm must be positive")
    floats = [k for k, v in state.items() if np.asarray(v).dtype.kind == "f"]
    deltas = {
        k: np.asarray(state[k], dtype=np.float64) - np.asarray(reference[k], dtype=np.float64)
        for k in floats
    }
    norm = float(np.sqrt(sum(float((d * d).sum()) for d in deltas.values())))
    if not np.isfinite(norm):
        raise ValueError("update is not finite")
    if norm <= max_norm:
        return dict(state)
    scale = max_norm / norm
    out = dict(state)
    for k, d in deltas.items():
        ref = np.asarray(reference[k], dtype=np.float64)
        out[k] = (ref + d * scale).astype(np.asarray(state[k]).dtype)
    return out


def aggregate_states(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    method: str = "mean",
    trim: float = 0.2,
    reference: Mapping[str, np.ndarray] | None = None,
    clip_norm: float | None = None,
) -> dict[str, np.ndarray]:
    """Combine copies of one half: clip (optional, needs `reference`), then mean, trimmed
    mean or median. `mean` without clipping is exactly `weighted_average`."""
    if clip_norm is not None:
        if reference is None:
            raise ValueError("clipping needs the reference (current global) weights")
        states = [clip_update(s, reference, clip_norm) for s in states]
    if method == "mean":
        return weighted_average(states, weights)
    if len(states) != len(weights):
        raise ValueError("one weight per state")
    if method == "median":
        return coordinate_median(states)
    if method == "trimmed-mean":
        return trimmed_mean(states, trim)
    raise ValueError(f"unknown aggregation {method!r}")
