"""SplitFed V1: clients train in parallel, each against its own copy of the server half.

At the end of the round the server copies and the client halves are each averaged, weighted by
sample count. With the same batches and optimizers this is FedAvg of the whole network, and the
tests hold it to exactly that.
"""

from __future__ import annotations

import copy
import time

import torch

from splitfed.algorithms.aggregate import weighted_average
from splitfed.algorithms.base import Algorithm, RoundTrain
from splitfed.client import CLIENT_PREFIX
from splitfed.model import ServerNet
from splitfed.server import ServerIO
from splitfed.training import load_numpy_state, make_optimizer, set_lr, state_to_numpy, unprefixed
from splitfed.wire import Message, MsgType


class SFLV1(Algorithm):
    name = "sflv1"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
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

    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        result = RoundTrain()
        # Per-client sums, added up in participant order at the end: batches arrive in any order
        # over a network, and float addition is not associative.
        per_client = {cid: RoundTrain() for cid in participants}
        copies = {cid: self._copy_for(cid) for cid in participants}
        updates: dict[str, tuple[dict, int]] = {}  # type: ignore[type-arg]
        tensors = self.global_tensors()
        for cid in participants:
            io.send(cid, MsgType.ROUND_START, self.round_body(cid), tensors)

        def on_message(msg: Message) -> None:
            if msg.type is MsgType.SMASHED:
                net, opt = copies[msg.src]
                grad, loss, correct, n = self.server_step(net, opt, msg, rnd)
                per_client[msg.src].add(loss, correct, n)
                self.reply_gradients(io, msg, grad, loss)
            elif msg.type is MsgType.CLIENT_UPDATE:
                updates[msg.src] = (
                    unprefixed(msg.tensors, CLIENT_PREFIX),
                    int(msg.env.body["n_samples"]),
                )
                active.discard(msg.src)

        active = set(participants)
        result.dropped = self.collect(
            io, active, time.monotonic() + timeout, on_message, f"round {rnd}"
        )
        for part in per_client.values():
            result.loss_sum += part.loss_sum
            result.correct += part.correct
            result.seen += part.seen
        done = [cid for cid in participants if cid in updates]
        result.completed = done
        if done:
            weights = [updates[c][1] for c in done]
            load_numpy_state(
                self.client_net, weighted_average([updates[c][0] for c in done], weights)
            )
            servers = [state_to_numpy(copies[c][0]) for c in done]
            load_numpy_state(self.server_net, weighted_average(servers, weights))
            self.version += 1
        return result

    def state(self) -> dict:  # type: ignore[type-arg]
        s = super().state()
        s["copies"] = {
            cid: (net.state_dict(), opt.state_dict()) for cid, (net, opt) in self.copies.items()
        }
        return s

    def load_state(self, state: dict) -> None:  # type: ignore[type-arg]
        super().load_state(state)
        for cid, (net_state, opt_state) in state.get("copies", {}).items():
            net, opt = self._copy_for(cid)
            net.load_state_dict(net_state)
            opt.load_state_dict(opt_state)
