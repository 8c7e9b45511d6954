"""Test doubles of misbehaving devices: the product's ClientRuntime with one thing changed.

They speak the protocol perfectly (so every wire check passes) and lie or stall where a real
attacker or a hung device would: a poisoned update, an inflated sample count, silence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from splitfed.client import ClientRuntime
from splitfed.wire import Message, MsgType


def update_norms(
    update: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, float]:
    """L2 norm of `update - reference` per half (`w.`, `s.` prefix), over the float tensors:
    the quantity `--clip-update-norm` bounds (splitfed.algorithms.aggregate.clip_update)."""
    sums: dict[str, float] = {}
    for k, v in update.items():
        ref = reference.get(k)
        if ref is None or v.dtype.kind != "f":
            continue
        d = v.astype(np.float64) - ref.astype(np.float64)
        half = k.split(".", 1)[0]
        sums[half] = sums.get(half, 0.0) + float((d * d).sum())
    return {h: float(np.sqrt(s)) for h, s in sums.items()}


class NormProbeRuntime(ClientRuntime):
    """An honest device that records how far each of its updates moved from the round's global
    weights (`norms`, one dict per round): what an honest update looks like, to pick a clip."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reference: dict[str, np.ndarray] = {}
        self.norms: list[dict[str, float]] = []

    def handle(self, msg: Message) -> list[Message]:
        if msg.type is MsgType.ROUND_START:
            self._reference = {k: np.array(v, copy=True) for k, v in msg.tensors.items()}
        out = super().handle(msg)
        for m in out:
            if m.type is MsgType.CLIENT_UPDATE:
                self.norms.append(update_norms(m.tensors, self._reference))
                self.transform(m)
        return out

    def transform(self, update: Message) -> None:
        """Change the outgoing update in place (honest: nothing)."""


class PoisonRuntime(NormProbeRuntime):
    """Sends `reference + scale * (trained - reference)` as its update: scale -1 flips the sign
    of what it learned, -100 also blows it up, +100 overshoots in the honest direction. The
    reference is the round's global weights; `norms` keeps the honest norms."""

    def __init__(self, *args: Any, scale: float = -100.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def transform(self, update: Message) -> None:
        for k, v in update.tensors.items():
            ref = self._reference.get(k)
            if ref is not None and v.dtype.kind == "f":
                update.tensors[k] = (ref + self.scale * (v - ref)).astype(v.dtype)


class InflatedCountRuntime(ClientRuntime):
    """Trains honestly but claims `factor` times its samples, to weigh more in the average."""

    def __init__(self, *args: Any, factor: int = 1000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.factor = factor

    def handle(self, msg: Message) -> list[Message]:
        out = super().handle(msg)
        for m in out:
            if m.type is MsgType.CLIENT_UPDATE:
                m.env.body["n_samples"] = int(m.env.body["n_samples"]) * self.factor
        return out


class SilentRuntime(ClientRuntime):
    """Stays connected but stops answering after `answers` gradients in round `round`
    (a hung training process behind a live MQTT connection)."""

    def __init__(self, *args: Any, round: int = 0, answers: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.silent_round = round
        self.answers = answers
        self.silenced = False

    def handle(self, msg: Message) -> list[Message]:
        if msg.env.round == self.silent_round and msg.type is MsgType.GRADIENTS:
            if self.answers <= 0:
                self.silenced = True
                return []
            self.answers -= 1
        return super().handle(msg)


class BadLabelRuntime(ClientRuntime):
    """Sends its batch number `batch` (from 0) of round `round` with labels out of range, which
    the aggregator rejects; the device then waits for a gradient that never comes."""

    def __init__(self, *args: Any, round: int = 0, batch: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bad_round, self.bad_batch, self.sent = round, batch, 0

    def handle(self, msg: Message) -> list[Message]:
        out = super().handle(msg)
        for m in out:
            if m.type is MsgType.SMASHED and m.env.round == self.bad_round:
                if self.sent == self.bad_batch:
                    m.tensors["labels"] = m.tensors["labels"] + 100
                self.sent += 1
        return out


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.adversaries --poison-scale S <edge-agent args>`: the real edge agent
    (edge_agent/cli.py, MQTT and all) with a PoisonRuntime inside."""
    import argparse
    import functools

    from edge_agent.cli import main as edge_agent

    p = argparse.ArgumentParser(prog="python -m tests.adversaries", add_help=False)
    p.add_argument("--poison-scale", type=float, required=True)
    args, rest = p.parse_known_args(argv)
    factory = functools.partial(PoisonRuntime, scale=args.poison_scale)
    edge_agent.main(args=rest, prog_name="edge-agent", obj={"runtime_factory": factory})


if __name__ == "__main__":
    main()
