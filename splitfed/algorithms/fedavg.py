"""FedAvg: every client trains the whole network on its own data; the server averages.

The baseline that SFLV1 must equal: the same seeded batches, the same per-copy optimizers,
the same weighted average, only without the cut.
"""

from __future__ import annotations

import time

from splitfed.algorithms.aggregate import weighted_average
from splitfed.algorithms.base import Algorithm, RoundTrain
from splitfed.client import CLIENT_PREFIX, SERVER_PREFIX
from splitfed.server import ServerIO
from splitfed.training import load_numpy_state, unprefixed
from splitfed.wire import Message, MsgType


class FedAvg(Algorithm):
    name = "fedavg"
    mode = "local"

    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        result = RoundTrain()
        updates: dict[str, Message] = {}
        tensors = self.global_tensors(full=True)
        for cid in participants:
            io.send(cid, MsgType.ROUND_START, self.round_body(cid), tensors)

        def on_message(msg: Message) -> None:
            if msg.type is MsgType.CLIENT_UPDATE and msg.env.body.get("full"):
                updates[msg.src] = msg
                body = msg.env.body
                result.loss_sum += float(body["loss_sum"])
                result.correct += int(body["correct"])
                result.seen += int(body["seen"])
                active.discard(msg.src)

        active = set(participants)
        result.dropped = self.collect(
            io, active, time.monotonic() + timeout, on_message, f"round {rnd}"
        )
        done = [cid for cid in participants if cid in updates]
        result.completed = done
        if done:
            weights = [int(updates[c].env.body["n_samples"]) for c in done]
            for prefix, net in ((CLIENT_PREFIX, self.client_net), (SERVER_PREFIX, self.server_net)):
                states = [unprefixed(updates[c].tensors, prefix) for c in done]
                load_numpy_state(net, weighted_average(states, weights))
            self.version += 1
        return result
