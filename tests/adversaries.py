"""Test doubles of misbehaving devices: the product's ClientRuntime with one thing changed.

They speak the protocol perfectly (so every wire check passes) and lie or stall where a real
attacker or a hung device would: a poisoned update, an inflated sample count, silence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from splitfed.client import ClientRuntime
from splitfed.wire import Message, MsgType


class PoisonRuntime(ClientRuntime):
    """Sends `reference + scale * (trained - reference)` as its update: scale -1 flips the sign
    of what it learned, -100 also blows it up. The reference is the round's global weights."""

    def __init__(self, *args: Any, scale: float = -100.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale
        self._reference: dict[str, np.ndarray] = {}

    def handle(self, msg: Message) -> list[Message]:
        if msg.type is MsgType.ROUND_START:
            self._reference = {k: np.array(v, copy=True) for k, v in msg.tensors.items()}
        out = super().handle(msg)
        for m in out:
            if m.type is MsgType.CLIENT_UPDATE:
                for k, v in m.tensors.items():
                    ref = self._reference.get(k)
                    if ref is not None and v.dtype.kind == "f":
                        m.tensors[k] = (ref + self.scale * (v - ref)).astype(v.dtype)
        return out


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
