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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.algorithms.aggregate import weighted_average
from splitfed.algorithms.base import Algorithm, RoundTrain
from splitfed.algorithms.pyvertical import AlgorithmIO
from splitfed.config import TrainConfig, round_lr
from splitfed.data.batches import iterate_batches, num_batches, to_tensor
from splitfed.data.clips import ClipDataset, clips_for, shard_indices
from splitfed.data.dataset import EmotionDataset
from splitfed.device import DeviceRuntime
from splitfed.emotions import NUM_CLASSES
from splitfed.errors import UserError
from splitfed.model import ModelConfig, seeded
from splitfed.runner import RunOptions, run, write_outputs
from splitfed.server import ServerIO
from splitfed.training import (
    confusion,
    load_numpy_state,
    make_optimizer,
    prefixed,
    set_lr,
    state_to_numpy,
    unprefixed,
)
from splitfed.transport import InProcessTransport
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

PREFIX = "w."
EVAL_BATCH = 256
DEFAULT_FRAMES = 4
DEFAULT_SEGMENTS = 2
FLOATS = frozenset({"F32", "F16"})


# ---- the model ----------------------------------------------------------------------------------


class SeqModelConfig(BaseModel):
    """The recurrent network and how it is cut in time."""

    model_config = ConfigDict(extra="forbid")

    frame_shape: tuple[int, int, int] = Field((1, 48, 96), description="C, H, W of one frame")
    frames: int = Field(DEFAULT_FRAMES, ge=1, description="frames per sequence")
    segments: int = Field(DEFAULT_SEGMENTS, ge=1, description="devices per client group")
    widths: tuple[int, ...] = Field(
        (16, 32, 64, 96), description="channels of each conv block of the frame encoder"
    )
    stem: int = Field(2, ge=1, le=4, description="stride of the encoder's first convolution")
    double: bool = Field(True, description="two convolutions per block, as in the split CNN")
    grid: tuple[int, int] = Field(
        (3, 6), description="pooled map that is flattened per frame; keeps where brows and lids are"
    )
    features: int = Field(128, ge=1, description="per-frame features fed to the GRU")
    hidden: int = Field(128, ge=1, description="GRU hidden size (what crosses between devices)")
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="dropout before the classifier")
    num_classes: int = Field(NUM_CLASSES, description="number of emotions")

    def model_post_init(self, _context: object) -> None:
        if self.segments > self.frames:
            raise ValueError(
                f"{self.segments} segments need at least as many frames, got {self.frames}"
            )

    def bounds(self, k: int) -> tuple[int, int]:
        """Frames [t0, t1) of segment k (as even as possible, earlier segments longer)."""
        cuts = np.cumsum(
            [0] + [len(a) for a in np.array_split(np.arange(self.frames), self.segments)]
        )
        return int(cuts[k]), int(cuts[k + 1])

    def segment_frames(self, k: int) -> int:
        t0, t1 = self.bounds(k)
        return t1 - t0


class FrameEncoder(nn.Module):
    """Each frame to a feature vector, with the conv stack of the split CNN.

    Blocks of (two) 3x3 convolutions with batch norm, pooling between blocks; the first
    convolution strides by `stem`. The last map is pooled to a small grid and flattened, which
    keeps where things are (how high a brow sits above its eye), then projected and normalised.
    """

    def __init__(self, cfg: SeqModelConfig) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = cfg.frame_shape[0]
        for i, width in enumerate(cfg.widths):
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, width, 3, stride=cfg.stem if i == 0 else 1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if cfg.double:
                layers += [
                    nn.Conv2d(width, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
            if i < len(cfg.widths) - 1:  # ceil: row bands of a crop are only a few rows high
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(cfg.grid)
        # Batch norm here keeps the GRU's inputs in range: without it the recurrent net does not
        # learn at the learning rate that suits the picture models (Adam, 2e-3).
        self.proj = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(c_in * cfg.grid[0] * cfg.grid[1], cfg.features, bias=False),
            nn.BatchNorm1d(cfg.features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.blocks(x)))


class Segment(nn.Module):
    """Sub-network k: encodes its frames and runs its GRU on, from the hidden state handed over."""

    def __init__(self, cfg: SeqModelConfig, k: int) -> None:
        super().__init__()
        self.k = k
        self.last = k == cfg.segments - 1
        self.encoder = FrameEncoder(cfg)
        self.gru = nn.GRU(cfg.features, cfg.hidden, batch_first=True)
        if self.last:
            self.dropout = nn.Dropout(cfg.dropout)
            self.fc = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T_k, C, H, W); h: (B, hidden) or None. Hidden state out, or logits if last."""
        b, t = x.shape[:2]
        feats = self.encoder(x.flatten(0, 1)).view(b, t, -1)
        _, hn = self.gru(feats, None if h is None else h.unsqueeze(0).contiguous())
        out = hn[0]
        return self.fc(self.dropout(out)) if self.last else out


def build_seq_model(cfg: SeqModelConfig, seed: int) -> nn.ModuleList:
    """All segments from one seed, so every device and the central model start alike."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.ModuleList([Segment(cfg, k) for k in range(cfg.segments)])
    finally:
        torch.random.set_rng_state(gen_state)


def frames_proxy(frames: np.ndarray, labels: np.ndarray | None) -> EmotionDataset:
    """(N, T, C, H, W) as (N, T*C, H, W): the shared batcher then draws one shift, mirror and
    lighting change per sequence, the same on every device of a group and in the un-split net."""
    n = len(frames)
    y = np.zeros(n, dtype=np.int64) if labels is None else labels
    return EmotionDataset("frames", frames.reshape(n, -1, *frames.shape[3:]), y)


def as_frames(x: torch.Tensor, c: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, c, *x.shape[2:])


# ---- a device: one segment of one client group --------------------------------------------------


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

    def _round_ok(self, env: Envelope) -> bool:
        if env.round < self._max_round:
            return False
        self._max_round = env.round
        return True

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
        batches = iterate_batches(
            frames_proxy(self.train, self.train_labels),
            cfg.batch_size,
            key,
            cfg.local_epochs,
            train=True,
            augment=cfg.augment,
        )
        steps = num_batches(len(self.train), cfg.batch_size) * cfg.local_epochs
        self.round = _SegRound(msg.env.round, batches, steps)
        if self.cfg.segments == 1:
            return self._train_alone(msg)
        if self.segment == 0:
            return [self._forward_first(msg)]
        return []

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.round is not None and self.cfg is not None
        x, y = next(self.round.batches)
        return as_frames(x, self.cfg.frame_shape[0]), y

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
        assert h_in.grad is not None
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
        assert h_in.grad is not None
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


# ---- the aggregator -----------------------------------------------------------------------------


class FedSL(Algorithm):
    """Relays hidden states and gradients along each group's chain; averages each segment."""

    name = "fedsl"
    mode = "local"  # the whole network lives on the devices; nothing to publish

    def __init__(self, model_cfg: SeqModelConfig, train_cfg: TrainConfig, seed: int) -> None:
        super().__init__(ModelConfig(), train_cfg, seed)
        # The model is the segmented recurrent network, all of it on the devices.
        self.model_cfg = model_cfg  # type: ignore[assignment]
        self.segments = build_seq_model(model_cfg, seed)
        self.client_net = self.segments  # type: ignore[assignment]
        self.server_net = nn.ModuleDict()  # type: ignore[assignment]
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

    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        result = RoundTrain()
        groups = self._ready_groups(io, participants)
        updates: dict[str, Message] = {}
        failed: set[int] = set()
        for devs in groups.values():
            for cid in devs:
                io.send(cid, MsgType.ROUND_START, self.body(cid), self._weights(cid))

        def on_message(msg: Message) -> None:
            if msg.type is MsgType.SMASHED:
                self._relay(io, msg, groups)
            elif msg.type is MsgType.CLIENT_UPDATE:
                updates[msg.src] = msg
                active.discard(msg.src)

        def on_drop(cid: str) -> None:
            g = self.member[cid][0]
            failed.add(g)
            for other in groups[g]:
                active.discard(other)

        active = {c for devs in groups.values() for c in devs}
        result.dropped = self.collect(
            io, active, time.monotonic() + timeout, on_message, f"round {rnd}", on_drop
        )
        done = [
            g for g, devs in groups.items() if g not in failed and all(c in updates for c in devs)
        ]
        for g in done:
            last = updates[groups[g][-1]].env.body
            result.loss_sum += float(last["loss_sum"])
            result.correct += int(last["correct"])
            result.seen += int(last["seen"])
            result.completed += groups[g]
        if done:
            weights = [int(updates[groups[g][0]].env.body["n_samples"]) for g in done]
            for k, seg in enumerate(self.segments):
                states = [unprefixed(updates[groups[g][k]].tensors, PREFIX) for g in done]
                load_numpy_state(seg, weighted_average(states, weights))
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


# ---- the un-split network trained in one place (the oracle of the equivalence test) -------------


class CentralSequence:
    """The same segments chained in one process, over whole clips, with the same batches,
    augmentation, seeded forward passes and one optimizer per segment."""

    def __init__(self, cfg: SeqModelConfig, train_cfg: TrainConfig, seed: int) -> None:
        self.cfg, self.train_cfg, self.seed = cfg, train_cfg, seed
        self.segments = build_seq_model(cfg, seed)
        self.opts = [make_optimizer(s.parameters(), train_cfg) for s in self.segments]

    def forward(self, x: torch.Tensor, rnd: int, step: int) -> torch.Tensor:
        h = None
        for k, seg in enumerate(self.segments):
            t0, t1 = self.cfg.bounds(k)
            with seeded(self.seed, rnd, 0, step, k):
                h = seg(x[:, t0:t1], h)
        assert h is not None
        return h

    def train_round(
        self, rnd: int, clips: np.ndarray, labels: np.ndarray, rounds: int = 1
    ) -> tuple[float, float]:
        """One round (of `rounds`, for the learning-rate schedule) over all clips."""
        cfg = self.train_cfg
        for opt in self.opts:
            set_lr(opt, round_lr(cfg, rnd, rounds))
        loss_sum, correct, seen = 0.0, 0, 0
        self.segments.train()
        batches = iterate_batches(
            frames_proxy(clips, labels),
            cfg.batch_size,
            (self.seed, rnd, 0),
            cfg.local_epochs,
            train=True,
            augment=cfg.augment,
        )
        for step, (x, y) in enumerate(batches):
            out = self.forward(as_frames(x, self.cfg.frame_shape[0]), rnd, step)
            loss = nn.functional.cross_entropy(out, y)
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in self.opts:
                opt.step()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def predict(self, clips: np.ndarray) -> np.ndarray:
        self.segments.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(clips), EVAL_BATCH):
                xt = to_tensor(clips[s : s + EVAL_BATCH])
                out.append(self.forward(xt, 0, 0).argmax(1).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ---- simulation ---------------------------------------------------------------------------------


def device_id(group: int, segment: int) -> str:
    return f"client-{group:02d}-s{segment}"


def build_federation(
    clips: ClipDataset,
    shards: list[tuple[np.ndarray, np.ndarray]],
    model_cfg: SeqModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    run_id: str = "sim",
) -> tuple[FedSL, AlgorithmIO, list[SegmentRuntime]]:
    """Devices (groups x segments), transport and aggregator for one in-process run."""
    if clips.frames != model_cfg.frames:
        raise UserError(
            f"sequences have {clips.frames} frames, the model expects {model_cfg.frames}"
        )
    runtimes = []
    last = model_cfg.segments - 1
    for g, (tr, te) in enumerate(shards):
        for k in range(model_cfg.segments):
            t0, t1 = model_cfg.bounds(k)
            runtimes.append(
                SegmentRuntime(
                    device_id(g, k),
                    run_id,
                    g,
                    k,
                    clips.clips[tr, t0:t1],
                    clips.clips[te, t0:t1],
                    clips.labels[tr] if k == last else None,
                    clips.labels[te] if k == last else None,
                )
            )
    algo = FedSL(model_cfg, train_cfg, seed)
    io = AlgorithmIO(InProcessTransport(runtimes), run_id, train_cfg, algo.specs())  # type: ignore[arg-type]
    return algo, io, runtimes


def simulate_fedsl(
    data: EmotionDataset,
    spec: Any,
    on_round: Any = None,
    frames: int = DEFAULT_FRAMES,
    segments: int = DEFAULT_SEGMENTS,
) -> dict[str, Any]:
    """`aggregator simulate --algo fedsl`: spec.clients client groups of `segments` devices each."""
    clips = clips_for(data, frames)
    if segments > clips.frames:
        raise UserError(f"{segments} segments need sequences of at least {segments} frames")
    split = spec.split or ("subject" if clips.subjects is not None else "random")
    partition = spec.partition or ("subject" if clips.subjects is not None else "iid")
    train_idx, test_idx, shards = shard_indices(
        clips.labels, clips.subjects, spec.clients, partition, split, spec.seed, clips.name
    )
    base = spec.model or ModelConfig()
    model_cfg = SeqModelConfig(
        frame_shape=clips.frame_shape,
        frames=clips.frames,
        segments=segments,
        dropout=base.dropout,
        num_classes=base.num_classes,
    )
    train_cfg = spec.train or TrainConfig()
    if train_cfg.compression == "int8":
        log.info("fedsl sends hidden states as fp16 (int8 is for conv feature maps)")
    algo, io, _ = build_federation(clips, shards, model_cfg, train_cfg, spec.seed, spec.run_id)
    data_info = {
        "name": data.name,
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        "split": split,
        "partition": partition,
        "synthetic": bool(data.meta.get("synthetic", False)),
        "clients_samples": [int(len(tr)) for tr, _ in shards],
        "sequence": str(clips.meta.get("sequence", f"clips of {clips.frames} frames")),
    }
    opts = RunOptions(
        rounds=spec.rounds,
        min_clients=spec.clients * segments,
        checkpoint_dir=spec.out_dir / "checkpoint" if spec.out_dir else None,
        resume=False,
        data_info=data_info,
        on_round=on_round,
    )
    metrics = run(algo, io, opts)
    metrics["clients"] = spec.clients
    metrics["fedsl"] = {
        "segments": segments,
        "frames": clips.frames,
        "devices": spec.clients * segments,
        "hidden": model_cfg.hidden,
    }
    if spec.out_dir is not None:
        write_outputs(metrics, spec.out_dir)
    return metrics


def _register() -> None:
    from splitfed.simulate import EXTRA_SIMULATORS

    EXTRA_SIMULATORS["fedsl"] = simulate_fedsl


_register()
