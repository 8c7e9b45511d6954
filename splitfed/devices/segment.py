"""A FedSL device: one segment (in time) of the clips of one client group.

It holds its frames of each clip (and the labels if it is the last segment) and its
sub-network; only hidden states and their gradients leave it, through the aggregator. Its
training frames are augmented, jitter (`TrainConfig.jitter`) included, with the draws of the
un-split network for the same frames (`splitfed.algorithms.fedsl.model.sequence_batches`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.algorithms.fedsl.model import (
    EVAL_BATCH,
    FLOATS,
    PREFIX,
    Segment,
    SeqModelConfig,
    build_seq_model,
    jitter_problem,
    sequence_batches,
)
from splitfed.config import TrainConfig
from splitfed.data.batches import num_batches, to_tensor
from splitfed.device import DeviceRuntime
from splitfed.emotions import NUM_CLASSES
from splitfed.errors import UserError
from splitfed.model import seeded
from splitfed.training import (
    confusion,
    load_numpy_state,
    make_optimizer,
    prefixed,
    set_lr,
    state_to_numpy,
    unprefixed,
)
from splitfed.wire import (
    Envelope,
    Message,
    MsgType,
    Sequencer,
    ShapeSpec,
    Validator,
    encode,
    weights_spec,
)

log = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    seed: int = 0
    group: int = Field(0, ge=0)
    segment: int = Field(0, ge=0)
    model: dict[str, Any]
    train: dict[str, Any]
    split: str = "test"
    lr: float | None = None


@dataclass
class _SegRound:
    round: int
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    steps: int
    step: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    pending: tuple[torch.Tensor | None, torch.Tensor] | None = None  # (incoming leaf, output)


@dataclass
class _SegEval:
    round: int
    split: str
    steps: int
    done: int = 0
    conf: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64))
    logits: list[np.ndarray] = field(default_factory=list)


class SegmentRuntime(DeviceRuntime):
    """Device (group, segment): its frames of each clip, the labels if last, its sub-network."""

    def __init__(
        self,
        client_id: str,
        run_id: str,
        group: int,
        segment: int,
        train: np.ndarray,
        test: np.ndarray,
        train_labels: np.ndarray | None = None,
        test_labels: np.ndarray | None = None,
        aggregator_id: str = "aggregator",
    ) -> None:
        if train.ndim != 5 or train.dtype != np.uint8 or test.ndim != 5:
            raise ValueError("segment frames must be uint8 (N, T, C, H, W)")
        if train.shape[1:] != test.shape[1:] and len(test):
            raise UserError(
                f"{client_id}: training and test sequences of different lengths "
                f"({train.shape[1]} and {test.shape[1]} frames)"
            )
        self.client_id = client_id
        self.group, self.segment = group, segment
        self.train, self.test = train, test
        self.train_labels, self.test_labels = train_labels, test_labels
        self.seq = Sequencer(client_id, run_id)
        self.cfg: SeqModelConfig | None = None
        self.train_cfg: TrainConfig | None = None
        self.net: Segment | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.round: _SegRound | None = None
        self.evals: dict[str, _SegEval] = {}
        self.last_logits: dict[str, np.ndarray] = {}  # the last evaluation's outputs, if last
        self.rejected = 0
        self._seed = 0
        self._max_round = 0
        self._spec_cache: dict[str, ShapeSpec] = {}
        self._validator = Validator(
            run_id,
            {
                MsgType.ROUND_START: self._weights_spec,
                MsgType.EVAL_REQUEST: self._weights_spec,
                MsgType.SMASHED: self._hidden_spec("hidden"),
                MsgType.EVAL_SMASHED: self._hidden_spec("hidden"),
                MsgType.GRADIENTS: self._hidden_spec("grad"),
            },
            known_sender=lambda src: src == aggregator_id,
            round_ok=self._round_ok,
        )

    @property
    def is_last(self) -> bool:
        return self.train_labels is not None

    def _weights_spec(self, env: Envelope) -> ShapeSpec:
        key = f"{sorted(env.body['model'].items())}"
        if key not in self._spec_cache:
            cfg = SeqModelConfig.model_validate(env.body["model"])
            if not self.segment < cfg.segments:
                raise ValueError(f"segment {self.segment} of a {cfg.segments}-segment model")
            net = build_seq_model(cfg, 0)[self.segment]
            self._spec_cache[key] = weights_spec(state_to_numpy(net), PREFIX)
        return self._spec_cache[key]

    def _hidden_spec(self, name: str) -> Any:
        def spec(env: Envelope) -> ShapeSpec:
            if self.cfg is None:
                raise ValueError("no model yet")
            return {name: (FLOATS, (-1, self.cfg.hidden))}

        return spec

    # ---- protocol -----------------------------------------------------------------------------

    def join(self) -> bytes:
        counts = (
            np.bincount(self.train_labels, minlength=NUM_CLASSES)
            if self.is_last
            else np.zeros(NUM_CLASSES)
        )
        body = {
            "client_id": self.client_id,
            "n_train": len(self.train),
            "n_test": len(self.test),
            "class_counts": [int(c) for c in counts],
            "input_shape": list(self.train.shape[2:]),
            "role": "segment",
            "group": self.group,
            "segment": self.segment,
            "frames": int(self.train.shape[1]),
            "labels": self.is_last,
        }
        return encode(self.seq.make(MsgType.JOIN, 0, body))

    def handle(self, msg: Message) -> list[Message]:
        handlers = {
            MsgType.ROUND_START: self._on_round_start,
            MsgType.SMASHED: self._on_hidden,
            MsgType.GRADIENTS: self._on_gradients,
            MsgType.EVAL_REQUEST: self._on_eval_request,
            MsgType.EVAL_SMASHED: self._on_eval_hidden,
        }
        return handlers[msg.type](msg)

    def _reply(
        self,
        msg: Message,
        type: MsgType,
        body: dict[str, Any],
        tensors: dict[str, np.ndarray] | None = None,
    ) -> Message:
        return self.seq.make(type, msg.env.round, body, tensors, reply_to=msg.env.message_id)

    def _wire(self, x: torch.Tensor) -> np.ndarray:
        assert self.train_cfg is not None
        a = x.detach().numpy().astype(np.float32)
        return a if self.train_cfg.compression == "fp32" else a.astype(np.float16)

    # ---- set-up -------------------------------------------------------------------------------

    def _configure(self, msg: Message) -> _Body:
        body = _Body.model_validate(msg.env.body)
        cfg = SeqModelConfig.model_validate(body.model)
        train_cfg = TrainConfig.model_validate(body.train)
        if body.segment != self.segment or body.group != self.group:
            raise ValueError(
                f"message for device ({body.group}, {body.segment}), this is "
                f"({self.group}, {self.segment})"
            )
        if cfg.segment_frames(self.segment) != self.train.shape[1]:
            raise ValueError(
                f"the model's segment has {cfg.segment_frames(self.segment)} frames, "
                f"this device holds {self.train.shape[1]}"
            )
        if (self.segment == cfg.segments - 1) != self.is_last:
            raise ValueError("only the last segment's device holds the labels")
        problem = jitter_problem(cfg, train_cfg)  # the aggregator refuses it first (FedSL)
        if problem:
            raise ValueError(problem)
        if cfg != self.cfg or self.net is None:
            self.net = build_seq_model(cfg, body.seed)[self.segment]  # type: ignore[assignment]
            assert self.net is not None
            self.opt = make_optimizer(self.net.parameters(), train_cfg)
        self.cfg, self.train_cfg, self._seed = cfg, train_cfg, body.seed
        load_numpy_state(self.net, unprefixed(msg.tensors, PREFIX))
        return body

    def _update(self, msg: Message) -> Message:
        r = self.round
        assert r is not None and self.net is not None
        body = {
            "n_samples": len(self.train),
            "steps": r.step,
            "seen": r.samples,
            "segment": self.segment,
            "loss_sum": r.loss_sum,
            "correct": r.correct,
        }
        self.round = None
        return self._reply(
            msg, MsgType.CLIENT_UPDATE, body, prefixed(state_to_numpy(self.net), PREFIX)
        )

    # ---- training -----------------------------------------------------------------------------

    def _on_round_start(self, msg: Message) -> list[Message]:
        body = self._configure(msg)
        assert self.train_cfg is not None and self.cfg is not None
        cfg = self.train_cfg
        lr = cfg.lr if body.lr is None else body.lr
        if not 0 <= lr <= 10:
            raise ValueError(f"learning rate {lr} out of range")
        set_lr(self.opt, lr)
        key = (body.seed, msg.env.round, self.group)
        # Augmented and jittered (cfg.jitter) as the un-split network does these frames.
        batches = sequence_batches(
            self.train, self.train_labels, self.cfg, cfg, key, self.cfg.bounds(self.segment)[0]
        )
        steps = num_batches(len(self.train), cfg.batch_size) * cfg.local_epochs
        self.round = _SegRound(msg.env.round, batches, steps)
        if self.cfg.segments == 1:
            return self._train_alone(msg)
        if self.segment == 0:
            return [self._forward_first(msg)]
        return []

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.round is not None
        return next(self.round.batches)

    def _forward_first(self, msg: Message) -> Message:
        r = self.round
        assert r is not None and self.net is not None
        if r.step >= r.steps:
            return self._update(msg)
        x, _ = self._batch()
        self.net.train()
        with seeded(self._seed, r.round, self.group, r.step, self.segment):
            h = self.net(x, None)
        r.pending = (None, h)
        r.samples += len(x)
        return self._reply(
            msg,
            MsgType.SMASHED,
            {"step": r.step, "direction": "forward"},
            {"hidden": self._wire(h)},
        )

    def _train_alone(self, msg: Message) -> list[Message]:
        """One segment per group: the whole network is on this device."""
        r = self.round
        assert r is not None and self.net is not None and self.opt is not None
        self.net.train()
        while r.step < r.steps:
            x, y = self._batch()
            with seeded(self._seed, r.round, self.group, r.step, 0):
                out = self.net(x, None)
            self._learn(out, y)
        return [self._update(msg)]

    def _learn(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        r = self.round
        assert r is not None and self.opt is not None
        loss = nn.functional.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        r.loss_sum += loss.item() * len(y)
        r.correct += int((logits.argmax(1) == y).sum())
        r.samples += len(y)
        r.step += 1

    def _on_hidden(self, msg: Message) -> list[Message]:
        """The hidden state of the device before, for the current step: run this segment on."""
        r = self.round
        if r is None or self.segment == 0 or r.round != msg.env.round or r.pending is not None:
            raise ValueError("hidden state without a round in progress")
        if int(msg.env.body.get("step", -1)) != r.step or r.step >= r.steps:
            raise ValueError(f"hidden state for step {msg.env.body.get('step')}, expected {r.step}")
        assert self.net is not None
        x, y = self._batch()
        h_in = torch.from_numpy(msg.tensors["hidden"].astype(np.float32)).requires_grad_(True)
        if h_in.shape[0] != len(x):
            raise ValueError(f"hidden state for {h_in.shape[0]} sequences, the batch has {len(x)}")
        self.net.train()
        with seeded(self._seed, r.round, self.group, r.step, self.segment):
            out = self.net(x, h_in)
        if not self.is_last:
            r.pending = (h_in, out)
            r.samples += len(x)
            return [
                self._reply(
                    msg,
                    MsgType.SMASHED,
                    {"step": r.step, "direction": "forward"},
                    {"hidden": self._wire(out)},
                )
            ]
        step = r.step
        self._learn(out, y)
        return self._send_back(msg, h_in, step)

    def _on_gradients(self, msg: Message) -> list[Message]:
        r = self.round
        if r is None or r.pending is None or r.round != msg.env.round:
            raise ValueError("gradients without a step in flight")
        if int(msg.env.body.get("step", -1)) != r.step:
            raise ValueError(f"gradients for step {msg.env.body.get('step')}, expected {r.step}")
        h_in, out = r.pending
        grad = torch.from_numpy(msg.tensors["grad"].astype(np.float32))
        if grad.shape != out.shape:
            raise ValueError(
                f"gradient shape {tuple(grad.shape)} != hidden state {tuple(out.shape)}"
            )
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        out.backward(grad)
        self.opt.step()
        r.pending = None
        step = r.step
        r.step += 1
        if h_in is None:  # the first segment: on to the next batch
            return [self._forward_first(msg)]
        return self._send_back(msg, h_in, step)

    def _send_back(self, msg: Message, h_in: torch.Tensor, step: int) -> list[Message]:
        """Step `step`'s gradient of the hidden state that came in, to the device before; and
        this segment's update once its last step is done."""
        r = self.round
        assert r is not None and h_in.grad is not None
        replies = [
            self._reply(
                msg,
                MsgType.SMASHED,
                {"step": step, "direction": "backward"},
                {"grad": self._wire(h_in.grad)},
            )
        ]
        if r.step == r.steps:
            replies.append(self._update(msg))
        return replies

    # ---- evaluation ---------------------------------------------------------------------------

    def _eval_data(self, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        if split == "train":
            return self.train, self.train_labels
        if split == "test":
            return self.test, self.test_labels
        raise ValueError(f"unknown split {split!r}")

    def _result(self, msg: Message, ev: _SegEval) -> Message:
        self.evals.pop(ev.split, None)
        self.last_logits[ev.split] = (
            np.concatenate(ev.logits) if ev.logits else np.zeros((0, NUM_CLASSES))
        )
        return self._reply(
            msg, MsgType.EVAL_RESULT, {"split": ev.split, "confusion": ev.conf.tolist()}
        )

    def _on_eval_request(self, msg: Message) -> list[Message]:
        body = self._configure(msg)
        assert self.net is not None and self.cfg is not None
        frames, labels = self._eval_data(body.split)
        steps = -(-len(frames) // EVAL_BATCH)
        ev = _SegEval(msg.env.round, body.split, steps)
        if self.segment > 0:
            self.evals[body.split] = ev
            return [self._result(msg, ev)] if steps == 0 and self.is_last else []
        out = []
        self.net.eval()
        with torch.no_grad():
            for s in range(steps):
                x = frames[s * EVAL_BATCH : (s + 1) * EVAL_BATCH]
                h = self.net(to_tensor(x), None)
                if self.is_last:
                    assert labels is not None
                    self._count(ev, h, labels[s * EVAL_BATCH : (s + 1) * EVAL_BATCH])
                else:
                    b = {"split": body.split, "step": s, "steps": steps}
                    out.append(self._reply(msg, MsgType.EVAL_SMASHED, b, {"hidden": self._wire(h)}))
        if self.is_last:
            return [self._result(msg, ev)]
        return out

    def _count(self, ev: _SegEval, logits: torch.Tensor, y: np.ndarray) -> None:
        ev.conf += confusion(y, logits.argmax(1).numpy())
        ev.logits.append(logits.numpy())
        ev.done += 1

    def _on_eval_hidden(self, msg: Message) -> list[Message]:
        split = str(msg.env.body.get("split"))
        ev = self.evals.get(split)
        s = int(msg.env.body.get("step", -1))
        if ev is None or ev.round != msg.env.round or s != ev.done:
            raise ValueError(f"hidden state for unexpected eval step {split}/{s}")
        assert self.net is not None
        frames, labels = self._eval_data(split)
        x = frames[s * EVAL_BATCH : (s + 1) * EVAL_BATCH]
        h_in = torch.from_numpy(msg.tensors["hidden"].astype(np.float32))
        if h_in.shape[0] != len(x):
            raise ValueError("hidden state does not match the eval batch")
        self.net.eval()
        with torch.no_grad():
            out = self.net(to_tensor(x), h_in)
        if not self.is_last:
            ev.done += 1
            if ev.done == ev.steps:
                self.evals.pop(split)
            b = {"split": split, "step": s, "steps": ev.steps}
            return [self._reply(msg, MsgType.EVAL_SMASHED, b, {"hidden": self._wire(out)})]
        assert labels is not None
        self._count(ev, out, labels[s * EVAL_BATCH : (s + 1) * EVAL_BATCH])
        return [self._result(msg, ev)] if ev.done == ev.steps else []
