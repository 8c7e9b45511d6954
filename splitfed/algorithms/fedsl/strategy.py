"""FedSL: federated split learning of a recurrent network over sequences split across devices.

The data are short clips (an expression unfolding from neutral, `splitfed.data.clips`). Each
clip is cut in time into S segments, and each segment lives on a different device: a *client
group* is a chain of S devices that hold the segments of the same clips. Device (g, k) holds
sub-network k: a small CNN that encodes each of its frames and a GRU that runs over them,
starting from the hidden state that device (g, k-1) handed on. The last device of the chain
also holds the labels and the classifier.

Per training step in each group: (g, 0) encodes its frames and sends its hidden state
(SMASHED); the aggregator relays it to (g, 1) (SMASHED), and so on; the last device computes the
loss, steps, and sends the gradient of its incoming hidden state back (SMASHED, direction
backward); the aggregator relays it (GRADIENTS) to the device before, which steps and passes the
gradient on, until (g, 0) steps and starts the next batch. Groups run in parallel; at the end of
the round every device sends its sub-network (CLIENT_UPDATE) and the aggregator averages each
sub-network k over the groups, weighted by their sample counts (FedAvg per segment). Neither
pixels nor labels reach the aggregator; it only relays hidden states and their gradients.

"clients" of this algorithm are client groups (the federated dimension, one group per share of
the people, as with every other algorithm); each group has `segments` devices, so a run with
n clients has n x segments devices. With one group this is the un-split recurrent network
trained in one place, step for step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from splitfed.algorithms.base import RoundState, RoundTrain, Strategy
from splitfed.algorithms.fedsl.model import (
    FLOATS,
    PREFIX,
    SeqModelConfig,
    build_seq_model,
    jitter_problem,
)
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.emotions import NUM_CLASSES
from splitfed.errors import UserError, refuse
from splitfed.server import ServerIO
from splitfed.training import (
    prefixed,
    state_to_numpy,
)
from splitfed.wire import (
    Envelope,
    Message,
    MsgType,
    ShapeSpec,
    weights_spec,
)

log = logging.getLogger(__name__)


@dataclass
class _Round(RoundState):
    groups: dict[int, list[str]] = field(default_factory=dict)  # the groups training this round
    failed: set[int] = field(default_factory=set)


class FedSL(Strategy):
    """Relays hidden states and gradients along each group's chain; averages each segment."""

    name = "fedsl"
    mode = "local"  # the whole network lives on the devices; nothing to publish

    def __init__(
        self,
        model_cfg: SeqModelConfig,
        train_cfg: TrainConfig,
        seed: int,
        aggregation: AggregationConfig | None = None,
    ) -> None:
        refuse(jitter_problem(model_cfg, train_cfg))
        super().__init__(train_cfg, seed, aggregation)
        # The model is the segmented recurrent network, all of it on the devices.
        self.model_cfg: SeqModelConfig = model_cfg
        self.segments = build_seq_model(model_cfg, seed)
        self.member: dict[str, tuple[int, int]] = {}  # device -> (group, segment)
        self.groups: dict[int, list[str]] = {}  # group -> devices in segment order

    # ---- membership ---------------------------------------------------------------------------

    def _layout(self, io: ServerIO) -> None:
        """Groups from the devices' JOINs; an incomplete or inconsistent chain is a setup error."""
        info = getattr(io, "join_info", {})
        cfg = self.model_cfg
        groups: dict[int, dict[int, str]] = {}
        for cid in self.indices:
            body = info.get(cid, {})
            g, k, frames = body.get("group"), body.get("segment"), body.get("frames")
            if not isinstance(g, int) or not isinstance(k, int) or not 0 <= k < cfg.segments:
                raise UserError(
                    f"device {cid} did not say which group and segment ({cfg.segments}) it holds"
                )
            if frames != cfg.segment_frames(k):
                raise UserError(
                    f"device {cid} holds {frames}-frame segments, segment {k} of the model has "
                    f"{cfg.segment_frames(k)}: sequences of different lengths"
                )
            if k in groups.setdefault(g, {}):
                raise UserError(
                    f"devices {groups[g][k]} and {cid} both hold segment {k} of group {g}"
                )
            groups[g][k] = cid
        for g, devs in groups.items():
            if len(devs) != cfg.segments:
                raise UserError(
                    f"group {g} has segments {sorted(devs)}, the model needs 0..{cfg.segments - 1}"
                )
            sizes = {info[c]["n_train"] for c in devs.values()}
            tests = {info[c]["n_test"] for c in devs.values()}
            if len(sizes) > 1 or len(tests) > 1:
                raise UserError(
                    f"the devices of group {g} hold different numbers of sequences "
                    f"({sorted(sizes)} train, {sorted(tests)} test)"
                )
        self.groups = {
            g: [devs[k] for k in range(cfg.segments)] for g, devs in sorted(groups.items())
        }
        self.member = {c: (g, k) for g, devs in self.groups.items() for k, c in enumerate(devs)}

    def specs(self) -> dict[MsgType, Any]:
        hidden = (FLOATS, (-1, self.model_cfg.hidden))
        seg_specs = [weights_spec(state_to_numpy(s), PREFIX) for s in self.segments]

        def smashed(env: Envelope) -> ShapeSpec:
            return {"grad" if env.body.get("direction") == "backward" else "hidden": hidden}

        def update(env: Envelope) -> ShapeSpec:
            return seg_specs[self.member[env.src][1]]

        return {
            MsgType.SMASHED: smashed,
            MsgType.EVAL_SMASHED: {"hidden": hidden},
            MsgType.CLIENT_UPDATE: update,
            MsgType.EVAL_RESULT: {},
        }

    def body(self, cid: str, **extra: Any) -> dict[str, Any]:
        g, k = self.member[cid]
        return {
            "algo": self.name,
            "seed": self.seed,
            "group": g,
            "segment": k,
            "model": self.model_cfg.model_dump(mode="json"),
            "train": self.train_cfg.model_dump(mode="json"),
            "weights_version": self.version,
            "lr": self.lr,
            **extra,
        }

    def _weights(self, cid: str) -> dict[str, np.ndarray]:
        return prefixed(state_to_numpy(self.segments[self.member[cid][1]]), PREFIX)

    def _ready_groups(self, io: ServerIO, participants: list[str]) -> dict[int, list[str]]:
        if not self.groups:
            self._layout(io)
        ready = {g: d for g, d in self.groups.items() if all(c in participants for c in d)}
        for g in set(self.groups) - set(ready):
            log.warning("group %d is incomplete this round; it sits out", g)
        return ready

    def _relay(self, io: ServerIO, msg: Message, groups: dict[int, list[str]]) -> None:
        g, k = self.member[msg.src]
        chain = groups[g]
        s = int(msg.env.body["step"])
        if msg.type is MsgType.EVAL_SMASHED:
            if k + 1 >= len(chain):
                raise ValueError("the last segment sent a hidden state")
            body = {k_: msg.env.body[k_] for k_ in ("split", "step", "steps")}
            io.send(
                chain[k + 1], MsgType.EVAL_SMASHED, body, msg.tensors, reply_to=msg.env.message_id
            )
        elif msg.env.body.get("direction") == "backward":
            if k == 0:
                raise ValueError("the first segment sent a gradient")
            io.send(
                chain[k - 1],
                MsgType.GRADIENTS,
                {"step": s},
                msg.tensors,
                reply_to=msg.env.message_id,
            )
        else:
            if k + 1 >= len(chain):
                raise ValueError("the last segment sent a hidden state")
            io.send(
                chain[k + 1],
                MsgType.SMASHED,
                {"step": s, "direction": "forward"},
                msg.tensors,
                reply_to=msg.env.message_id,
            )

    # ---- training -----------------------------------------------------------------------------

    def configure_round(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        groups = self._ready_groups(io, participants)
        devices = [c for devs in groups.values() for c in devs]
        for cid in devices:
            io.send(cid, MsgType.ROUND_START, self.body(cid), self._weights(cid))
        return _Round(rnd, devices, set(devices), groups=groups)

    def handle(self, io: ServerIO, state: RoundState, msg: Message) -> None:
        assert isinstance(state, _Round)
        if msg.type is MsgType.SMASHED:
            self._relay(io, msg, state.groups)
        elif msg.type is MsgType.CLIENT_UPDATE:
            self.accept_update(io, state, msg, (PREFIX,))

    def sample_cap(self, io: ServerIO, state: RoundState, client_id: str) -> int:
        # The aggregator relays hidden states, not batches it can count: cap at the JOIN's count.
        info = io.clients.get(client_id)
        return info.n_train if info is not None else 0

    def on_drop(self, io: ServerIO, state: RoundState, client_id: str) -> None:
        assert isinstance(state, _Round)
        g = self.member[client_id][0]
        state.failed.add(g)  # a chain without one link cannot finish its steps
        for other in state.groups[g]:
            state.active.discard(other)

    def aggregate(self, io: ServerIO, state: RoundState) -> RoundTrain:
        assert isinstance(state, _Round)
        result, groups, updates = state.result, state.groups, state.updates
        done = [
            g
            for g, devs in groups.items()
            if g not in state.failed and all(c in updates for c in devs)
        ]
        for g in done:
            last = updates[groups[g][-1]].body
            result.loss_sum += float(last["loss_sum"])
            result.correct += int(last["correct"])
            result.seen += int(last["seen"])
            result.completed += groups[g]
        if done:
            weights = [updates[groups[g][0]].n_samples for g in done]
            for k, seg in enumerate(self.segments):
                self.average_into(
                    seg, [updates[groups[g][k]].halves[PREFIX] for g in done], weights, f"seg{k}"
                )
            self.version += 1
        return result

    # ---- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self, io: ServerIO, participants: list[str], split: str, timeout: float
    ) -> np.ndarray:
        conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        groups = self._ready_groups(io, participants)
        for devs in groups.values():
            for cid in devs:
                io.send(cid, MsgType.EVAL_REQUEST, self.body(cid, split=split), self._weights(cid))

        def on_message(msg: Message) -> None:
            nonlocal conf
            if msg.type is MsgType.EVAL_SMASHED and msg.env.body["split"] == split:
                self._relay(io, msg, groups)
            elif msg.type is MsgType.EVAL_RESULT and msg.env.body["split"] == split:
                g, k = self.member[msg.src]
                if k != self.model_cfg.segments - 1:
                    raise ValueError("only the last segment can count predictions")
                conf += np.asarray(msg.env.body["confusion"], dtype=np.int64)
                for c in groups[g]:
                    active.discard(c)

        def on_drop(cid: str) -> None:
            for other in groups[self.member[cid][0]]:
                active.discard(other)

        active = {c for devs in groups.values() for c in devs}
        self.collect(
            io, active, time.monotonic() + timeout, on_message, f"evaluation ({split})", on_drop
        )
        return conf

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []  # the aggregator trains nothing; devices get the round's rate in ROUND_START

    # ---- checkpoints --------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        return prefixed(state_to_numpy(self.segments), "client.")

    def state(self) -> dict[str, Any]:
        return {
            "segments": self.segments.state_dict(),
            "version": self.version,
            "indices": dict(self.indices),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.segments.load_state_dict(state["segments"])
        self.version = int(state["version"])
        self.indices = dict(state["indices"])
