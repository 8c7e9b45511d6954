"""Vanilla split learning: clients take turns; the client half is relayed from one to the next.

There is one server half. Each client in turn receives the current client half, trains through
all its batches with the server, and hands its client half back to be passed on.
"""

from __future__ import annotations

import time

from splitfed.algorithms.base import Algorithm, RoundTrain
from splitfed.client import CLIENT_PREFIX
from splitfed.server import ServerIO
from splitfed.training import load_numpy_state, unprefixed
from splitfed.wire import Message, MsgType


class SplitLearning(Algorithm):
    name = "sl"

    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        result = RoundTrain()
        deadline = time.monotonic() + timeout
        for cid in participants:
            io.send(cid, MsgType.ROUND_START, self.round_body(cid), self.global_tensors())
            active = {cid}

            def on_message(msg: Message, cid: str = cid, active: set[str] = active) -> None:
                if msg.type is MsgType.SMASHED:
                    grad, loss, correct, n = self.server_step(
                        self.server_net, self.server_opt, msg, rnd
                    )
                    result.add(loss, correct, n)
                    self.reply_gradients(io, msg, grad, loss)
                elif msg.type is MsgType.CLIENT_UPDATE:
                    load_numpy_state(self.client_net, unprefixed(msg.tensors, CLIENT_PREFIX))
                    result.completed.append(cid)
                    active.discard(cid)

            result.dropped += self.collect(io, active, deadline, on_message, f"round {rnd} ({cid})")
        self.version += 1
        return result
