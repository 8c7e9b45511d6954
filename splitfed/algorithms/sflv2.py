"""SplitFed V2: one server half, trained over all clients' batches in a random interleaved order.

Clients start the round together; the server takes their batches in a seeded random order
(each client's own batches stay in sequence) and steps its single server half on each. Client
halves are averaged at the end of the round. With one client this is centralized training.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from splitfed.algorithms.aggregate import interleaved_order, weighted_average
from splitfed.algorithms.base import Algorithm, RoundTrain
from splitfed.client import CLIENT_PREFIX
from splitfed.data.batches import num_batches
from splitfed.server import ServerIO
from splitfed.training import load_numpy_state, unprefixed
from splitfed.wire import Message, MsgType


class SFLV2(Algorithm):
    name = "sflv2"

    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        result = RoundTrain()
        counts = [
            num_batches(io.clients[c].n_train, self.train_cfg.batch_size)
            * self.train_cfg.local_epochs
            for c in participants
        ]
        order = deque(interleaved_order(counts, np.random.default_rng([self.seed, rnd, 0x5F12])))
        waiting: dict[str, Message] = {}
        gone: set[str] = set()
        updates: dict[str, tuple[dict, int]] = {}  # type: ignore[type-arg]
        tensors = self.global_tensors()
        for cid in participants:
            io.send(cid, MsgType.ROUND_START, self.round_body(cid), tensors)

        def advance() -> None:
            # Serve the schedule as far as the batches that have arrived allow.
            while order:
                cid = participants[order[0]]
                if cid in gone:
                    order.popleft()
                    continue
                msg = waiting.pop(cid, None)
                if msg is None:
                    return
                order.popleft()
                grad, loss, correct, n = self.server_step(
                    self.server_net, self.server_opt, msg, rnd
                )
                result.add(loss, correct, n)
                self.reply_gradients(io, msg, grad, loss)

        def on_message(msg: Message) -> None:
            if msg.type is MsgType.SMASHED:
                waiting[msg.src] = msg
                advance()
            elif msg.type is MsgType.CLIENT_UPDATE:
                updates[msg.src] = (
                    unprefixed(msg.tensors, CLIENT_PREFIX),
                    int(msg.env.body["n_samples"]),
                )
                active.discard(msg.src)

        def on_drop(cid: str) -> None:
            gone.add(cid)
            advance()

        active = set(participants)
        deadline = time.monotonic() + timeout
        result.dropped = self.collect(io, active, deadline, on_message, f"round {rnd}", on_drop)
        done = [cid for cid in participants if cid in updates]
        result.completed = done
        if done:
            weights = [updates[c][1] for c in done]
            load_numpy_state(
                self.client_net, weighted_average([updates[c][0] for c in done], weights)
            )
            self.version += 1
        return result
