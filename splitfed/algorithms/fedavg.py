"""FedAvg: every client trains the whole network on its own data; the server averages.

The baseline that SFLV1 must equal: the same seeded batches, the same per-copy optimizers,
the same weighted average, only without the cut. Only weights travel.
"""

from __future__ import annotations

from splitfed.algorithms.base import RoundState, RoundTrain
from splitfed.algorithms.cnn import SplitCNN
from splitfed.client import CLIENT_PREFIX, SERVER_PREFIX
from splitfed.server import ServerIO
from splitfed.wire import Message, MsgType


class FedAvg(SplitCNN):
    name = "fedavg"
    partable = True
    side_by_side = True
    mode = "local"

    def configure_round(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        return self.start_clients(io, rnd, participants)

    def handle(self, io: ServerIO, state: RoundState, msg: Message) -> None:
        if msg.type is MsgType.CLIENT_UPDATE and msg.env.body.get("full"):
            body = msg.env.body
            counts = float(body["loss_sum"]), int(body["correct"]), int(body["seen"])
            self.accept_update(io, state, msg, (CLIENT_PREFIX, SERVER_PREFIX))
            state.result.loss_sum += counts[0]
            state.result.correct += counts[1]
            state.result.seen += counts[2]

    def sample_cap(self, io: ServerIO, state: RoundState, client_id: str) -> int:
        # No smashed data to count: a device trains at most the set it declared at JOIN.
        return self.declared_samples(io, client_id)

    def part_samples(self, io: ServerIO, state: RoundState, msg: Message) -> int:
        # Whole models train on the device, unseen: what it says it trained (the cap follows).
        return int(msg.env.body["seen"])

    def aggregate(self, io: ServerIO, state: RoundState) -> RoundTrain:
        done = self.average_updates(
            state, {CLIENT_PREFIX: self.client_net, SERVER_PREFIX: self.server_net}
        )
        state.result.completed = done
        if done:
            self.version += 1
        return state.result
