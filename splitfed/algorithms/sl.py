"""Vanilla split learning: clients take turns; the client half is relayed from one to the next.

There is one server half. Each client in turn receives the current client half, trains through
all its batches with the server, and hands its client half back to be passed on. The round
waits on one client at a time: one that drops out or stops answering (the step timeout) is
skipped, and the next starts from the client half the last one handed back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitfed.algorithms.base import RoundState, RoundTrain
from splitfed.algorithms.cnn import SplitCNN
from splitfed.server import ServerIO
from splitfed.wire import Message, MsgType


@dataclass
class _Round(RoundState):
    queue: deque[str] = field(default_factory=deque)  # clients whose turn is still to come


class SplitLearning(SplitCNN):
    name = "sl"
    partable = True

    def configure_round(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        state = _Round(rnd, list(participants), set(), queue=deque(participants))
        self._next_turn(io, state)
        return state

    def _next_turn(self, io: ServerIO, state: _Round) -> None:
        """Hand the current client half to the next client in line."""
        state.waiting_on = None
        if state.queue:
            cid = state.queue.popleft()
            io.send(cid, MsgType.ROUND_START, self.round_body(cid), self.global_tensors())
            state.active.add(cid)
            state.waiting_on = cid

    def handle(self, io: ServerIO, state: RoundState, msg: Message) -> None:
        assert isinstance(state, _Round)
        if msg.type is MsgType.SMASHED:
            self.train_batch(io, state, msg, self.server_net, self.server_opt, state.result)
        elif msg.type is MsgType.FEATURE_GRADS:
            self.finish_batch(io, state, msg, state.result)
        elif msg.type is MsgType.CLIENT_UPDATE:
            # Relayed, not averaged: the sample count weighs nothing here.
            update = self.accept_update(io, state, msg, tuple(self.update_nets()))
            self.load_update(update)
            self.add_device_counts(state, msg.src, update, state.result)
            state.result.completed.append(msg.src)
            self._next_turn(io, state)

    def on_drop(self, io: ServerIO, state: RoundState, client_id: str) -> None:
        assert isinstance(state, _Round)
        self.pending.pop(client_id, None)
        if state.waiting_on == client_id:
            self._next_turn(io, state)

    def aggregate(self, io: ServerIO, state: RoundState) -> RoundTrain:
        assert isinstance(state, _Round)
        state.result.dropped.extend(state.queue)  # the round ran out of time before their turn
        self.version += 1
        return state.result
