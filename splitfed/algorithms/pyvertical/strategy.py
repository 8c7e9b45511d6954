"""PyVertical: private set intersection, then a multi-head SplitNN on vertically split crops.

Who holds what:

* Each data owner (a device, `OwnerRuntime`) holds one part of the eye region (a rectangle of
  every crop it has) under record ids, and one *head*: the first `cut` conv blocks, applied to
  its part. The head and its optimizer never leave the owner.
* The label holder (the aggregator, `PyVertical`) holds the labels under record ids and the
  *trunk*: the rest of the network. It never sees a pixel or a head weight.

Protocol (only existing message types; PSI protobufs travel as uint8 tensors):

1. PSI. The label holder encrypts its ids once (ECDH, its own key) and sends the query to every
   owner: ROUND_START{phase: psi} + `psi_request`. Each owner answers with its own ids encrypted
   under its key and the query re-encrypted: CLIENT_UPDATE{phase: psi} + `psi_setup`,
   `psi_response`. The label holder learns which of *its* ids each owner holds; an owner learns
   only how many ids the query had.
2. Alignment. The label holder intersects the answers and sends each owner the common ids (all
   of which that owner holds), training and test records apart, in one canonical order:
   ROUND_START{phase: align} + `train_ids`, `test_ids`. Owners acknowledge with CLIENT_UPDATE.
3. Training, in lock step. ROUND_START{phase: train} -> every owner sends SMASHED (its head's
   feature map for batch s of the shared seeded batch plan, no labels); when all owners' maps
   for step s are in, the trunk stitches them into the crop's layout, steps, and sends each
   owner GRADIENTS for its part; the owner steps its head and sends batch s+1, or CLIENT_UPDATE
   at the end.
4. Evaluation. EVAL_REQUEST -> owners send EVAL_SMASHED for their aligned held-out parts; the
   label holder predicts and counts against its labels.

"clients" of this algorithm are the data owners (vertical parts).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from splitfed.algorithm_io import byte_spec
from splitfed.algorithms.base import RoundState, RoundTrain, Strategy
from splitfed.algorithms.pyvertical.augment import jitter_problem
from splitfed.algorithms.pyvertical.model import (
    EVAL_BATCH,
    VerticalModelConfig,
    build_vertical_model,
)
from splitfed.config import TrainConfig
from splitfed.data.vertical import LabelTable, batch_flips, batch_plan
from splitfed.emotions import NUM_CLASSES
from splitfed.errors import UserError, refuse
from splitfed.model import seeded
from splitfed.psi import PsiQuerier, encode_ids, from_wire, to_wire
from splitfed.server import ServerIO
from splitfed.training import confusion, make_optimizer, prefixed, state_to_numpy
from splitfed.wire import (
    Envelope,
    Message,
    MsgType,
    ShapeSpec,
    activation_spec,
    pack_gradients,
    unpack_activations,
)

log = logging.getLogger(__name__)


@dataclass
class _Round(RoundState):
    plan: list[tuple[int, np.ndarray]] = field(default_factory=list)
    flips: list[torch.Tensor] = field(default_factory=list)
    waiting: dict[int, dict[str, Message]] = field(default_factory=dict)  # step -> owner -> maps


@dataclass
class Alignment:
    """The label holder's view after PSI."""

    train_ids: list[str]
    test_ids: list[str]
    y_train: np.ndarray
    y_test: np.ndarray
    per_owner: dict[str, int]  # how many of the label holder's ids each owner holds
    psi_bytes: int = 0
    psi_seconds: float = 0.0


class PyVertical(Strategy):
    """The label holder: runs PSI, holds labels and trunk, drives the owners in lock step."""

    name = "pyvertical"
    mode = "local"  # nothing to publish: heads stay with their owners

    def __init__(
        self, model_cfg: VerticalModelConfig, train_cfg: TrainConfig, seed: int, labels: LabelTable
    ) -> None:
        refuse(jitter_problem(model_cfg, train_cfg))
        super().__init__(train_cfg, seed)
        # The model is the multi-head network: the trunk here, the heads with their owners.
        self.model_cfg: VerticalModelConfig = model_cfg
        _, self.trunk = build_vertical_model(model_cfg, seed)
        self.server_opt = make_optimizer(self.trunk.parameters(), train_cfg)
        self.loss_fn = nn.CrossEntropyLoss()
        self.labels = labels
        self.aligned: Alignment | None = None
        # Each owner's JOIN count when the alignment ran: an owner that joined again since
        # (a restarted device) lost its aligned rows, and PSI runs again.
        self._aligned_joins: dict[str, int] = {}
        self.round_timeout = 600.0

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.server_opt]

    # ---- membership ---------------------------------------------------------------------------

    def owners(self) -> list[str]:
        return sorted(self.indices, key=self.indices.__getitem__)

    def _check_owners(self, io: ServerIO, participants: list[str]) -> None:
        owners = self.owners()
        if len(owners) != len(self.model_cfg.boxes):
            raise UserError(
                f"{len(owners)} data owners joined, the model has {len(self.model_cfg.boxes)} parts"
            )
        missing = [c for c in owners if c not in participants]
        if missing:
            raise RuntimeError(f"data owner(s) {', '.join(missing)} offline: every part is needed")
        for cid in owners:
            box = tuple(getattr(io, "join_info", {}).get(cid, {}).get("box", ()))
            want = tuple(self.model_cfg.boxes[self.indices[cid]])
            if box != want:
                raise UserError(
                    f"data owner {cid} holds part {box or '?'}, the model expects {want} "
                    "(owners take the parts in the sorted order of their ids: owner index K "
                    "needs the K-th id, e.g. owner-00, owner-01)"
                )

    def specs(self) -> dict[MsgType, Any]:
        """What the label holder accepts from owners (for `AlgorithmIO`)."""

        def act(env: Envelope) -> ShapeSpec:
            return activation_spec(
                self.train_cfg.compression, self.model_cfg.head_shape(self.indices[env.src])
            )

        def update(env: Envelope) -> ShapeSpec:
            if env.body.get("phase") == "psi":
                return byte_spec(env, "psi_setup", "psi_response")
            return {}

        return {MsgType.SMASHED: act, MsgType.EVAL_SMASHED: act, MsgType.CLIENT_UPDATE: update}

    def body(self, cid: str, phase: str, **extra: Any) -> dict[str, Any]:
        return {
            "algo": self.name,
            "phase": phase,
            "seed": self.seed,
            "owner_index": self.indices[cid],
            "model": self.model_cfg.model_dump(mode="json"),
            "train": self.train_cfg.model_dump(mode="json"),
            **extra,
        }

    # ---- PSI and alignment --------------------------------------------------------------------

    def align(self, io: ServerIO, timeout: float) -> Alignment:
        t0 = time.perf_counter()
        up0, down0 = io.transport.bytes_up, io.transport.bytes_down
        owners = self.owners()
        querier = PsiQuerier(self.labels.ids.tolist())
        request = querier.request()
        held: dict[str, list[str]] = {}
        for cid in owners:
            io.send(
                cid,
                MsgType.ROUND_START,
                {"algo": self.name, "phase": "psi", "psi_request_bytes": len(request)},
                {"psi_request": to_wire(request)},
            )

        def on_psi(msg: Message) -> None:
            if msg.type is MsgType.CLIENT_UPDATE and msg.env.body.get("phase") == "psi":
                held[msg.src] = querier.intersection(
                    from_wire(msg.tensors["psi_setup"]), from_wire(msg.tensors["psi_response"])
                )
                active.discard(msg.src)

        active = set(owners)
        dropped = self.collect(
            io, active, time.monotonic() + timeout, on_psi, "private set intersection"
        )
        if dropped:
            raise RuntimeError(f"data owner(s) {', '.join(dropped)} did not answer the PSI query")
        common = set(querier.ids)
        for cid in owners:
            if not held[cid]:
                raise UserError(
                    f"data owner {cid} shares no record id with the label holder: "
                    "no overlap (are the partitions of different people?)"
                )
            common &= set(held[cid])
        if not common:
            raise UserError(
                "no record id is held by every data owner and the label holder: no overlap "
                "(are the partitions of different people?)"
            )
        test = dict(zip(self.labels.ids.tolist(), self.labels.test.tolist(), strict=True))
        label = dict(zip(self.labels.ids.tolist(), self.labels.labels.tolist(), strict=True))
        train_ids = sorted(i for i in common if not test[i])
        test_ids = sorted(i for i in common if test[i])
        if len(train_ids) < 2:
            raise UserError(
                f"only {len(train_ids)} common training record(s) after PSI: too little overlap"
            )
        tensors = {"train_ids": encode_ids(train_ids), "test_ids": encode_ids(test_ids)}
        sizes = {f"{k}_bytes": int(v.size) for k, v in tensors.items()}
        for cid in owners:
            io.send(
                cid, MsgType.ROUND_START, {"algo": self.name, "phase": "align", **sizes}, tensors
            )

        def on_align(msg: Message) -> None:
            if msg.type is MsgType.CLIENT_UPDATE and msg.env.body.get("phase") == "align":
                n = int(msg.env.body["n_samples"])
                if n != len(train_ids):
                    raise ValueError(f"{msg.src} aligned {n} records, not {len(train_ids)}")
                active.discard(msg.src)

        active = set(owners)
        dropped = self.collect(io, active, time.monotonic() + timeout, on_align, "alignment")
        if dropped:
            raise RuntimeError(f"data owner(s) {', '.join(dropped)} did not align their records")
        log.info(
            "PSI: %d common records (%d train, %d test) of the label holder's %d",
            len(common),
            len(train_ids),
            len(test_ids),
            len(querier.ids),
        )
        return Alignment(
            train_ids,
            test_ids,
            np.asarray([label[i] for i in train_ids], dtype=np.int64),
            np.asarray([label[i] for i in test_ids], dtype=np.int64),
            {cid: len(held[cid]) for cid in owners},
            psi_bytes=(io.transport.bytes_up - up0) + (io.transport.bytes_down - down0),
            psi_seconds=time.perf_counter() - t0,
        )

    def _ensure_aligned(self, io: ServerIO, timeout: float) -> None:
        """Run PSI and alignment unless every owner still holds the current alignment."""
        joins = getattr(io, "joins", {})
        now = {c: joins.get(c, 0) for c in self.owners()}
        if self.aligned is not None and now == self._aligned_joins:
            return
        if self.aligned is not None:
            rejoined = sorted(c for c in now if now[c] != self._aligned_joins.get(c))
            log.info("data owner(s) %s joined again: aligning the records again", rejoined)
        self.aligned = self.align(io, timeout)
        self._aligned_joins = now

    def add_report(self, metrics: dict[str, Any], io: ServerIO) -> None:
        """Add what the label holder knows of the alignment to `metrics`: the aligned record
        counts, its own count, the owners' (from their JOINs), and what PSI cost."""
        al = self.aligned
        if al is None:
            return
        owners = self.owners()
        metrics["data"].update(n_train=len(al.train_ids), n_test=len(al.test_ids))
        metrics.update({
            "psi": {
                "label_records": len(self.labels.ids),
                "owner_records": [io.clients[c].n_train for c in owners],
                "held_by_each_owner": [al.per_owner[c] for c in owners],
                "intersection": len(al.train_ids) + len(al.test_ids),
                "bytes": al.psi_bytes,
                "seconds": al.psi_seconds,
                "boxes": [list(b) for b in self.model_cfg.boxes],
            },
        })  # fmt: skip

    # ---- training -----------------------------------------------------------------------------

    def configure_round(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        self._check_owners(io, participants)
        self._ensure_aligned(io, self.round_timeout)
        assert self.aligned is not None
        cfg = self.train_cfg
        n = len(self.aligned.train_ids)
        key = (self.seed, rnd, 0)
        mirror = self.model_cfg.mirrors()
        owners = self.owners()
        state = _Round(
            rnd,
            owners,
            set(owners),
            plan=batch_plan(n, cfg.batch_size, key, cfg.local_epochs),
            flips=batch_flips(n, cfg.batch_size, key, cfg.local_epochs, cfg.augment, mirror),
        )
        for cid in owners:
            body = self.body(cid, "train", weights_version=self.version, lr=self.lr)
            io.send(cid, MsgType.ROUND_START, body)
        return state

    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        self.round_timeout = timeout  # PSI and alignment, when needed, take the same limit
        return super().run_round(io, rnd, participants, timeout)

    def _step(self, io: ServerIO, state: _Round, s: int, msgs: dict[str, Message]) -> None:
        """One trunk step on all owners' maps for batch `s`; each owner gets its gradient."""
        assert self.aligned is not None
        owners = state.participants
        idx = state.plan[s][1]
        parts = [
            torch.from_numpy(unpack_activations(msgs[c].tensors)).requires_grad_(True)
            for c in owners
        ]
        if any(p.shape[0] != len(idx) for p in parts):
            raise ValueError(
                f"step {s}: batch sizes {[p.shape[0] for p in parts]}, expected {len(idx)}"
            )
        y = torch.from_numpy(self.aligned.y_train[idx])
        self.trunk.train()
        with seeded(self.seed, state.rnd, 0, s, 1):
            objective, loss, out = self.trunk.objective(parts, state.flips[s], y, self.loss_fn)
        self.server_opt.zero_grad(set_to_none=True)
        objective.backward()
        self.server_opt.step()
        state.result.add(loss.item(), int((out.argmax(1) == y).sum()), len(y))
        for c, p in zip(owners, parts, strict=True):
            assert p.grad is not None
            io.send(
                c,
                MsgType.GRADIENTS,
                {"step": s, "loss": loss.item()},
                pack_gradients(p.grad.numpy(), self.train_cfg.grad_compression),
                reply_to=msgs[c].env.message_id,
            )

    def handle(self, io: ServerIO, state: RoundState, msg: Message) -> None:
        assert isinstance(state, _Round)
        if msg.type is MsgType.SMASHED:
            s = int(msg.env.body["step"])
            if not 0 <= s < len(state.plan):
                raise ValueError(f"step {s} outside the round's {len(state.plan)} steps")
            state.waiting.setdefault(s, {})[msg.src] = msg
            if len(state.waiting[s]) == len(state.participants):
                self._step(io, state, s, state.waiting.pop(s))
        elif msg.type is MsgType.CLIENT_UPDATE and msg.env.body.get("phase") == "train":
            if int(msg.env.body["steps"]) != len(state.plan):
                raise ValueError(
                    f"{msg.src} ran {msg.env.body['steps']} steps, not {len(state.plan)}"
                )
            state.result.completed.append(msg.src)
            state.active.discard(msg.src)

    def on_drop(self, io: ServerIO, state: RoundState, client_id: str) -> None:
        # Lock step: no batch can finish without every part, so the round ends for all.
        state.active.clear()

    def aggregate(self, io: ServerIO, state: RoundState) -> RoundTrain:
        # Nothing to average: each owner keeps its own head; the trunk stepped as batches came.
        done = set(state.result.completed)  # in the owners' order, not the network's
        state.result.completed = [c for c in state.participants if c in done]
        if state.result.dropped:
            log.error(
                "round %d: owner(s) %s dropped out; the heads are out of step",
                state.rnd,
                state.result.dropped,
            )
        self.version += 1
        return state.result

    # ---- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self, io: ServerIO, participants: list[str], split: str, timeout: float
    ) -> np.ndarray:
        conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        self._ensure_aligned(io, timeout)
        assert self.aligned is not None
        y_all = self.aligned.y_train if split == "train" else self.aligned.y_test
        if len(y_all) == 0:
            return conf
        owners = self.owners()
        steps = -(-len(y_all) // EVAL_BATCH)
        waiting: dict[int, dict[str, Message]] = {}
        counts = dict.fromkeys(owners, 0)
        for cid in owners:
            io.send(cid, MsgType.EVAL_REQUEST, self.body(cid, "eval", split=split))

        def on_message(msg: Message) -> None:
            nonlocal conf
            if msg.type is not MsgType.EVAL_SMASHED or msg.env.body["split"] != split:
                return
            s = int(msg.env.body["step"])
            if int(msg.env.body["steps"]) != steps or not 0 <= s < steps:
                raise ValueError(
                    f"eval step {s} of {msg.env.body['steps']}, expected {steps} steps"
                )
            waiting.setdefault(s, {})[msg.src] = msg
            counts[msg.src] += 1
            if counts[msg.src] == steps:
                active.discard(msg.src)
            if len(waiting[s]) == len(owners):
                msgs = waiting.pop(s)
                y = y_all[s * EVAL_BATCH : (s + 1) * EVAL_BATCH]
                parts = [torch.from_numpy(unpack_activations(msgs[c].tensors)) for c in owners]
                if any(p.shape[0] != len(y) for p in parts):
                    raise ValueError(f"eval step {s}: batch sizes do not match the labels")
                self.trunk.eval()
                with torch.no_grad():
                    pred = self.trunk(parts).argmax(1).numpy()
                conf += confusion(y, pred)

        active = set(owners)
        self.collect(io, active, time.monotonic() + timeout, on_message, f"evaluation ({split})")
        return conf

    # ---- checkpoints --------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        return prefixed(state_to_numpy(self.trunk), "server.")

    def state(self) -> dict[str, Any]:
        return {
            "server": self.trunk.state_dict(),
            "server_opt": self.server_opt.state_dict(),
            "version": self.version,
            "indices": dict(self.indices),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.trunk.load_state_dict(state["server"])
        self.server_opt.load_state_dict(state["server_opt"])
        self.version = int(state["version"])
        self.indices = dict(state["indices"])
        self.aligned = None  # owners that restarted have to align again
