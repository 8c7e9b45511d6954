"""A PyVertical data owner: answers PSI, aligns its records, trains its head.

It holds one part (a rectangle) of every crop it has, under its own record ids, and the head
that sees that part; neither the pixels nor the head's weights ever leave it. Its training
parts are augmented, jitter (`TrainConfig.jitter`) included, as every other owner's parts of
the same records (`splitfed.algorithms.pyvertical.augment`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.algorithm_io import byte_spec
from splitfed.algorithms.pyvertical.augment import jitter_problem, owner_batches
from splitfed.algorithms.pyvertical.model import (
    EVAL_BATCH,
    VerticalModelConfig,
    build_vertical_model,
)
from splitfed.config import TrainConfig
from splitfed.data.batches import to_tensor
from splitfed.data.vertical import OwnerTable, batch_plan
from splitfed.device import DeviceRuntime
from splitfed.emotions import NUM_CLASSES
from splitfed.model import ClientNet, seeded
from splitfed.psi import PsiResponder, decode_ids, from_wire, to_wire
from splitfed.training import make_optimizer, set_lr
from splitfed.wire import (
    Envelope,
    Message,
    MsgType,
    Sequencer,
    ShapeSpec,
    Validator,
    encode,
    pack_activations,
)

log = logging.getLogger(__name__)


class _PhaseBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    phase: str
    seed: int = 0
    owner_index: int = Field(0, ge=0)
    model: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    split: str = "test"
    lr: float | None = None


@dataclass
class _OwnerRound:
    round: int
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    steps: int
    step: int = 0
    samples: int = 0
    pending: torch.Tensor | None = None


@dataclass
class _Aligned:
    train: np.ndarray
    test: np.ndarray
    ids: dict[str, list[str]] = field(default_factory=dict)


class OwnerRuntime(DeviceRuntime):
    """A data owner: answers PSI, aligns its records, trains its head; never sends a pixel."""

    def __init__(
        self,
        client_id: str,
        run_id: str,
        table: OwnerTable,
        aggregator_id: str = "aggregator",
        psi_structure: str = "raw",
    ) -> None:
        self.client_id = client_id
        self.table = table
        self.seq = Sequencer(client_id, run_id)
        self.responder = PsiResponder(table.ids.tolist(), psi_structure)
        self.cfg: VerticalModelConfig | None = None
        self.train_cfg: TrainConfig | None = None
        self.index = -1
        self.head: ClientNet | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.aligned: _Aligned | None = None
        self.round: _OwnerRound | None = None
        self.rejected = 0
        self._seed = 0
        self._max_round = 0
        self._validator = Validator(
            run_id,
            {
                MsgType.ROUND_START: self._start_spec,
                MsgType.GRADIENTS: self._grad_spec,
                MsgType.EVAL_REQUEST: {},
            },
            known_sender=lambda src: src == aggregator_id,
            round_ok=self._round_ok,
        )

    def _start_spec(self, env: Envelope) -> ShapeSpec:
        phase = env.body["phase"]
        if phase == "psi":
            return byte_spec(env, "psi_request")
        if phase == "align":
            return byte_spec(env, "train_ids", "test_ids")
        if phase == "train":
            return {}
        raise ValueError(f"unknown phase {phase!r}")

    def _grad_spec(self, env: Envelope) -> ShapeSpec:
        if self.cfg is None:
            raise ValueError("gradients before training started")
        return {"grad": (frozenset({"F32", "F16"}), (-1, *self.cfg.head_shape(self.index)))}

    # ---- protocol -----------------------------------------------------------------------------

    def join(self) -> bytes:
        body = {
            "client_id": self.client_id,
            "n_train": len(self.table),
            "n_test": 0,
            "class_counts": [0] * NUM_CLASSES,  # an owner holds no labels
            "input_shape": list(self.table.part_shape),
            "role": "owner",
            "box": list(self.table.box),
        }
        return encode(self.seq.make(MsgType.JOIN, 0, body))

    def handle(self, msg: Message) -> list[Message]:
        body = (
            _PhaseBody.model_validate(msg.env.body) if msg.type is not MsgType.GRADIENTS else None
        )
        if msg.type is MsgType.ROUND_START:
            assert body is not None
            handler = {"psi": self._on_psi, "align": self._on_align, "train": self._on_train}[
                body.phase
            ]
            return handler(msg, body)
        if msg.type is MsgType.GRADIENTS:
            return self._on_gradients(msg)
        assert body is not None
        return self._on_eval(msg, body)

    def _reply(
        self,
        msg: Message,
        type: MsgType,
        body: dict[str, Any],
        tensors: dict[str, np.ndarray] | None = None,
    ) -> Message:
        return self.seq.make(type, msg.env.round, body, tensors, reply_to=msg.env.message_id)

    def _on_psi(self, msg: Message, body: _PhaseBody) -> list[Message]:
        setup, response = self.responder.respond(from_wire(msg.tensors["psi_request"]))
        reply = {
            "phase": "psi",
            "n_samples": len(self.table),
            "steps": 0,
            "seen": 0,
            "psi_setup_bytes": len(setup),
            "psi_response_bytes": len(response),
        }
        tensors = {"psi_setup": to_wire(setup), "psi_response": to_wire(response)}
        return [self._reply(msg, MsgType.CLIENT_UPDATE, reply, tensors)]

    def _on_align(self, msg: Message, body: _PhaseBody) -> list[Message]:
        train_ids = decode_ids(msg.tensors["train_ids"])
        test_ids = decode_ids(msg.tensors["test_ids"])
        if len(set(train_ids) | set(test_ids)) != len(train_ids) + len(test_ids):
            raise ValueError("alignment lists repeat a record")
        self.aligned = _Aligned(
            self.table.rows(train_ids),
            self.table.rows(test_ids),
            {"train": train_ids, "test": test_ids},
        )
        self.round = None
        reply = {"phase": "align", "n_samples": len(train_ids), "steps": 0, "seen": 0}
        return [self._reply(msg, MsgType.CLIENT_UPDATE, reply)]

    def _configure(self, body: _PhaseBody) -> None:
        if body.model is None or body.train is None:
            raise ValueError("no model configuration")
        cfg = VerticalModelConfig.model_validate(body.model)
        train_cfg = TrainConfig.model_validate(body.train)
        if (
            not body.owner_index < len(cfg.boxes)
            or tuple(cfg.boxes[body.owner_index]) != self.table.box
        ):
            raise ValueError(
                f"the model's part {body.owner_index} is not this owner's part {self.table.box}"
            )
        problem = jitter_problem(cfg, train_cfg)  # the label holder refuses it first
        if problem:
            raise ValueError(problem)
        if cfg != self.cfg or self.head is None or body.owner_index != self.index:
            heads, _ = build_vertical_model(cfg, body.seed)
            self.head = heads[body.owner_index]
            self.opt = make_optimizer(self.head.parameters(), train_cfg)
        self.cfg, self.train_cfg, self.index = cfg, train_cfg, body.owner_index

    def _on_train(self, msg: Message, body: _PhaseBody) -> list[Message]:
        if self.aligned is None:
            raise ValueError("training before alignment")
        self._configure(body)
        assert self.train_cfg is not None
        cfg = self.train_cfg
        images = self.table.images[self.aligned.train]
        lr = cfg.lr if body.lr is None else body.lr
        if not 0 <= lr <= 10:
            raise ValueError(f"learning rate {lr} out of range")
        set_lr(self.opt, lr)
        assert self.cfg is not None
        key = (body.seed, msg.env.round, 0)
        steps = len(batch_plan(len(images), cfg.batch_size, key, cfg.local_epochs))
        # Augmented and jittered (cfg.jitter) alike in every part of a record.
        batches = owner_batches(images, self.cfg, cfg, key, self.index)
        self.round = _OwnerRound(msg.env.round, batches, steps)
        self._seed = body.seed
        return [self._next(msg)]

    def _next(self, msg: Message) -> Message:
        r = self.round
        assert r is not None and self.head is not None and self.train_cfg is not None
        if r.step >= r.steps:
            self.round = None
            body = {
                "phase": "train",
                "n_samples": len(self.aligned.train) if self.aligned else 0,
                "steps": r.step,
                "seen": r.samples,
            }
            return self._reply(msg, MsgType.CLIENT_UPDATE, body)
        x, _ = next(r.batches)
        self.head.train()
        with seeded(self._seed, r.round, self.index, r.step, 0):
            act = self.head(x)
        r.pending = act
        r.samples += len(x)
        tensors = pack_activations(act.detach().numpy(), self.train_cfg.compression)
        return self._reply(msg, MsgType.SMASHED, {"step": r.step}, tensors)

    def _on_gradients(self, msg: Message) -> list[Message]:
        r = self.round
        if r is None or r.pending is None or r.round != msg.env.round:
            raise ValueError("gradients without a batch in flight")
        if int(msg.env.body.get("step", -1)) != r.step:
            raise ValueError(f"gradients for step {msg.env.body.get('step')}, expected {r.step}")
        grad = torch.from_numpy(msg.tensors["grad"].astype(np.float32))
        if grad.shape != r.pending.shape:
            raise ValueError(
                f"gradient shape {tuple(grad.shape)} != activations {tuple(r.pending.shape)}"
            )
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        r.pending.backward(grad)
        self.opt.step()
        r.pending = None
        r.step += 1
        return [self._next(msg)]

    def _on_eval(self, msg: Message, body: _PhaseBody) -> list[Message]:
        if self.aligned is None:
            raise ValueError("evaluation before alignment")
        if body.split not in ("train", "test"):
            raise ValueError(f"unknown split {body.split!r}")
        self._configure(body)
        assert self.head is not None and self.train_cfg is not None
        rows = self.aligned.train if body.split == "train" else self.aligned.test
        images = self.table.images[rows]
        steps = -(-len(images) // EVAL_BATCH)
        out = []
        self.head.eval()
        with torch.no_grad():
            for s in range(steps):
                act = self.head(to_tensor(images[s * EVAL_BATCH : (s + 1) * EVAL_BATCH]))
                tensors = pack_activations(act.numpy(), self.train_cfg.compression)
                b = {"split": body.split, "step": s, "steps": steps}
                out.append(self._reply(msg, MsgType.EVAL_SMASHED, b, tensors))
        return out
