"""Reference oracles of the equivalence tests: the federated networks trained in one place.

Each trains the same network as a federation does, with the same batches, augmentation (jitter
included), seeded forward passes and one optimizer per part, but without any message: a
federated run must match it step for step. They are test code, not product: nothing deploys them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from splitfed.algorithms.fedsl.model import (
    EVAL_BATCH,
    SeqModelConfig,
    build_seq_model,
    sequence_batches,
)
from splitfed.algorithms.pyvertical.augment import owner_batches
from splitfed.algorithms.pyvertical.model import VerticalModelConfig, build_vertical_model
from splitfed.config import TrainConfig, round_lr
from splitfed.data.batches import to_tensor
from splitfed.data.vertical import batch_plan
from splitfed.model import seeded
from splitfed.training import make_optimizer, set_lr


class CentralVertical:
    """The multi-head network trained centrally on already aligned parts, with the same batches,
    augmentation, seeded forward passes and one optimizer per head as the federation."""

    def __init__(self, cfg: VerticalModelConfig, train_cfg: TrainConfig, seed: int) -> None:
        self.cfg, self.train_cfg, self.seed = cfg, train_cfg, seed
        self.heads, self.trunk = build_vertical_model(cfg, seed)
        self.head_opts = [make_optimizer(h.parameters(), train_cfg) for h in self.heads]
        self.trunk_opt = make_optimizer(self.trunk.parameters(), train_cfg)
        self.loss_fn = nn.CrossEntropyLoss()

    def train_round(
        self, rnd: int, parts: list[np.ndarray], labels: np.ndarray, rounds: int = 1
    ) -> tuple[float, float]:
        """One round (of `rounds`, for the learning-rate schedule) over all aligned records."""
        cfg = self.train_cfg
        for opt in (*self.head_opts, self.trunk_opt):
            set_lr(opt, round_lr(cfg, rnd, rounds))
        key = (self.seed, rnd, 0)
        plan = batch_plan(len(labels), cfg.batch_size, key, cfg.local_epochs)
        iters = [owner_batches(p, self.cfg, cfg, key, k) for k, p in enumerate(parts)]
        loss_sum, correct, seen = 0.0, 0, 0
        for s, (_, idx) in enumerate(plan):
            acts = []
            for k, (head, it) in enumerate(zip(self.heads, iters, strict=True)):
                head.train()
                x, flip = next(it)
                with seeded(self.seed, rnd, k, s, 0):
                    acts.append(head(x))
            self.trunk.train()
            y = torch.from_numpy(labels[idx])
            with seeded(self.seed, rnd, 0, s, 1):  # views: the trunk's objective has more terms
                objective, loss, out = self.trunk.objective(acts, flip, y, self.loss_fn)
            for opt in (*self.head_opts, self.trunk_opt):
                opt.zero_grad(set_to_none=True)
            objective.backward()
            for opt in (*self.head_opts, self.trunk_opt):
                opt.step()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def predict(self, parts: list[np.ndarray]) -> np.ndarray:
        for h in self.heads:
            h.eval()
        self.trunk.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(parts[0]), EVAL_BATCH):
                acts = [
                    h(to_tensor(p[s : s + EVAL_BATCH]))
                    for h, p in zip(self.heads, parts, strict=True)
                ]
                out.append(self.trunk(acts).argmax(1).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


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
        batches = sequence_batches(clips, labels, self.cfg, cfg, (self.seed, rnd, 0))
        for step, (x, y) in enumerate(batches):
            out = self.forward(x, rnd, step)
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
