"""SplitFed V2: one server half, trained over all clients' batches.

Clients start the round together. By default (`sflv2_order: lockstep`) the server takes the
clients' i-th batches together, in a seeded random order, answers each batch's gradient, and
steps its single server half once on their sample-weighted mean gradient (`StepGroup`): with
the batch the devices share (`TrainConfig.split_batch`) it takes centralized training's steps,
each on the shared batch's gradient. `interleaved` takes all clients' batches in a seeded
random order (each client's own in sequence) and steps on each; `sequential` serves the
clients one after another, in a random order drawn each round, as the SplitFed paper
describes. Those two step once per device batch. Client halves are averaged at the end of the
round (or part). With one client every order is centralized training.

The server waits on one client at a time (the next in the order); a client that stays connected
but stops answering is skipped after the step timeout and the others go on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from splitfed.algorithms.aggregate import interleaved_order, lockstep_order, sequential_order
from splitfed.algorithms.base import RoundState, RoundTrain
from splitfed.algorithms.cnn import SplitCNN, StepGroup
from splitfed.server import ServerIO
from splitfed.wire import Message, MsgType


@dataclass
class _Round(RoundState):
    # (client position, whether its batch closes its step group), in the order served
    order: deque[tuple[int, bool]] = field(default_factory=deque)
    group: StepGroup = field(default_factory=StepGroup)
    waiting: dict[str, Message] = field(default_factory=dict)  # a batch that came early
    gone: set[str] = field(default_factory=set)


class SFLV2(SplitCNN):
    name = "sflv2"
    partable = True
    side_by_side = True

    def configure_round(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        cfg = self.train_cfg
        counts = [self.part_batches(io, c) for c in participants]
        key = [self.seed, rnd, 0x5F12, *([self.part] if self.parts > 1 else [])]
        rng = np.random.default_rng(key)
        if cfg.sflv2_order == "lockstep":
            groups = lockstep_order(counts, rng)
        else:  # a step per batch: groups of one
            schedule = sequential_order if cfg.sflv2_order == "sequential" else interleaved_order
            groups = [[c] for c in schedule(counts, rng)]
        order = deque((c, i == len(g) - 1) for g in groups for i, c in enumerate(g))
        base = self.start_clients(io, rnd, participants)
        state = _Round(base.rnd, base.participants, base.active, order=order)
        self._advance(io, state)
        return state

    def _advance(self, io: ServerIO, state: _Round) -> None:
        """Serve the schedule as far as the batches that have arrived allow."""
        while state.order:
            if self.pending:  # U-shape: the batch in flight finishes before the next starts
                state.waiting_on = next(iter(self.pending))
                return
            position, last = state.order[0]
            cid = state.participants[position]
            if cid in state.gone:
                state.order.popleft()
                if last:  # the group's last device is gone: step on the rest
                    state.group.close(self.server_opt)
                continue
            msg = state.waiting.pop(cid, None)
            if msg is None:
                state.waiting_on = cid
                return
            state.order.popleft()
            try:
                self.train_batch(io, state, msg, self.server_net, self.server_opt,
                                 state.result, state.group, last)  # fmt: skip
            except Exception:  # a rejected batch: its group still steps on the others
                if last:
                    state.group.close(self.server_opt)
                raise
        # The schedule is done: the clients' updates are what the round waits for now.
        state.waiting_on = next(
            (c for c in state.participants if c in state.active and c not in state.updates), None
        )

    def handle(self, io: ServerIO, state: RoundState, msg: Message) -> None:
        assert isinstance(state, _Round)
        if msg.type is MsgType.SMASHED:
            state.waiting[msg.src] = msg
            self._advance(io, state)
        elif msg.type is MsgType.FEATURE_GRADS:
            self.finish_batch(io, state, msg, state.result)
            self._advance(io, state)
        elif msg.type is MsgType.CLIENT_UPDATE:
            update = self.accept_update(io, state, msg, tuple(self.update_nets()))
            self.add_device_counts(state, msg.src, update, state.result)
            self._advance(io, state)

    def on_drop(self, io: ServerIO, state: RoundState, client_id: str) -> None:
        assert isinstance(state, _Round)
        state.gone.add(client_id)
        step = self.pending.pop(client_id, None)
        if step is not None and step.last:  # U-shape: its group waited on this batch
            state.group.close(self.server_opt)
        self._advance(io, state)

    def aggregate(self, io: ServerIO, state: RoundState) -> RoundTrain:
        done = self.average_updates(state, self.update_nets())
        state.result.completed = done
        if done:
            self.version += 1
        return state.result
