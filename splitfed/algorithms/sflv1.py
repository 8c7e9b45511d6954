"""SplitFed V1: clients train in parallel, each against its own copy of the server half.

At the end of the round the server copies and the client halves are each averaged, weighted by
sample count. With the same batches and optimizers this is FedAvg of the whole network, and the
tests hold it to exactly that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from splitfed.algorithms.base import RoundState, RoundTrain
from splitfed.algorithms.cnn import SplitCNN
from splitfed.client import CLIENT_PREFIX, SERVER_PREFIX
from splitfed.model import ServerNet
from splitfed.server import ServerIO
from splitfed.training import make_optimizer, set_lr, state_to_numpy
from splitfed.wire import Message, MsgType


@dataclass
class _Round(RoundState):
    copies: dict[str, tuple[ServerNet, torch.optim.Optimizer]] = field(default_factory=dict)
    # Per-client sums, added up in participant order at the end: batches arrive in any order
    # over a network, and float addition is not associative.
    per_client: dict[str, RoundTrain] = field(default_factory=dict)


class SFLV1(SplitCNN):
    name = "sflv1"
    partable = True
    side_by_side = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One server copy and one optimizer per client, kept across rounds like the client's own.
        self.copies: dict[str, tuple[ServerNet, torch.optim.Optimizer]] = {}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.server_opt, *(opt for _, opt in self.copies.values())]

    def _copy_for(self, cid: str) -> tuple[ServerNet, torch.optim.Optimizer]:
        if cid not in self.copies:
            net = copy.deepcopy(self.server_net)
            self.copies[cid] = (net, make_optimizer(net.parameters(), self.train_cfg))
        net, opt = self.copies[cid]
        set_lr(opt, self.lr)
        # load_state_dict copies in place, so the optimizer stays bound to the parameters.
        net.load_state_dict(self.server_net.state_dict())
        return net, opt

    def configure_round(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        copies = {cid: self._copy_for(cid) for cid in participants}
        base = self.start_clients(io, rnd, participants)
        return _Round(
            base.rnd,
            base.participants,
            base.active,
            copies=copies,
            per_client={cid: RoundTrain() for cid in participants},
        )

    def handle(self, io: ServerIO, state: RoundState, msg: Message) -> None:
        assert isinstance(state, _Round)
        if msg.type is MsgType.SMASHED:
            net, opt = state.copies[msg.src]
            self.train_batch(io, state, msg, net, opt, state.per_client[msg.src])
        elif msg.type is MsgType.FEATURE_GRADS:
            self.finish_batch(io, state, msg, state.per_client[msg.src])
        elif msg.type is MsgType.CLIENT_UPDATE:
            update = self.accept_update(io, state, msg, tuple(self.update_nets()))
            self.add_device_counts(state, msg.src, update, state.per_client[msg.src])

    def aggregate(self, io: ServerIO, state: RoundState) -> RoundTrain:
        assert isinstance(state, _Round)
        for part in state.per_client.values():
            state.result.merge(part)
        nets = self.update_nets()
        head = {p: n for p, n in nets.items() if p != CLIENT_PREFIX}  # U-shape: devices' heads
        done = self.average_updates(state, {CLIENT_PREFIX: self.client_net})
        state.result.completed = done
        if done:
            servers = [state_to_numpy(state.copies[c][0]) for c in done]
            weights = [state.updates[c].n_samples for c in done]
            self.average_into(self.server_net, servers, weights, SERVER_PREFIX)
            # After the server copies, whose own head is only the round's starting one.
            self.average_updates(state, head)
            self.version += 1
        return state.result

    def state(self) -> dict[str, Any]:
        s = super().state()
        s["copies"] = {
            cid: (net.state_dict(), opt.state_dict()) for cid, (net, opt) in self.copies.items()
        }
        return s

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        for cid, (net_state, opt_state) in state.get("copies", {}).items():
            net, opt = self._copy_for(cid)
            net.load_state_dict(net_state)
            opt.load_state_dict(opt_state)
