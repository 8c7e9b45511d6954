"""Server-side optimizers over the round's aggregate: FedAvg with a server learning rate,
FedAvgM and FedAdam (Reddi et al., 2021).

Plain FedAvg replaces the global half by the aggregate of the devices' copies. FedOpt reads the
difference `aggregate - global` as a pseudo-gradient and steps the global half along it with a
server optimizer: plain SGD (`sgd`, x + lr * delta) scales the step; with lr equal to the
number of devices it is the sum of their updates, so K devices that each took 1/K of an epoch's
steps move the model about as far as one epoch of centralized training. Heavy-ball momentum
(FedAvgM, Hsu et al. 2019) carries the direction of past rounds across the noise of few, non-IID
devices; Adam (FedAdam) also scales each weight's step. With `none` the aggregate is loaded
unchanged, bit for bit.

Only trainable parameters are stepped. Buffers (BatchNorm's running statistics and counters)
are not gradients of anything and take the aggregate as is. The state is one dictionary of
tensors per run, keyed by half, so checkpoints keep it and a resumed run continues the same
momentum. SFLV1 and FedAvg step their halves through this one function with the same keys, so
they stay equal with any server optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

ServerOptState = dict[str, torch.Tensor]


def server_step(
    current: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    params: set[str],
    state: ServerOptState,
    half: str,
    kind: str,
    lr: float,
    momentum: float,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> dict[str, np.ndarray]:
    """The new global half; updates `state` (keys `half.m.NAME`, `half.v.NAME`, `half.t`)."""
    if kind == "none":
        return dict(aggregate)
    if kind not in ("sgd", "momentum", "adam"):
        raise ValueError(f"unknown server optimizer {kind!r}")
    t_key = f"{half}.t"
    step = int(state[t_key].item()) + 1 if t_key in state else 1
    state[t_key] = torch.tensor(step, dtype=torch.int64)
    out: dict[str, np.ndarray] = {}
    for name, agg in aggregate.items():
        if name not in params:
            out[name] = agg
            continue
        x = torch.from_numpy(np.asarray(current[name], dtype=np.float64))
        delta = torch.from_numpy(np.asarray(agg, dtype=np.float64)) - x
        if kind == "sgd":  # stateless: nothing to keep but the step count
            out[name] = (x + lr * delta).numpy().astype(np.asarray(agg).dtype)
            continue
        m_key = f"{half}.m.{name}"
        m = state.get(m_key, torch.zeros_like(delta)).to(torch.float64)
        if kind == "momentum":
            m = momentum * m + delta
            new = x + lr * m
        else:
            v_key = f"{half}.v.{name}"
            v = state.get(v_key, torch.zeros_like(delta)).to(torch.float64)
            m = momentum * m + (1 - momentum) * delta
            v = beta2 * v + (1 - beta2) * delta * delta
            # Bias-corrected as in Adam, so the first rounds are not damped towards zero.
            m_hat = m / (1 - momentum**step)
            v_hat = v / (1 - beta2**step)
            new = x + lr * m_hat / (v_hat.sqrt() + tau)
            state[v_key] = v.to(torch.float32)
        state[m_key] = m.to(torch.float32)
        out[name] = new.numpy().astype(np.asarray(agg).dtype)
    return out
