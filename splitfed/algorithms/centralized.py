"""Centralized training: all the data in one place, the whole network, one process.

The upper bound that the split algorithms are measured against, and the oracle of the
equivalence tests: split learning with one client must match it step for step. It uses the
same seeded batches and the same seeded forward passes as a client with index 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from splitfed.algorithms.base import RoundState, RoundTrain
from splitfed.algorithms.cnn import SplitCNN
from splitfed.data.batches import iterate_batches
from splitfed.data.dataset import EmotionDataset
from splitfed.emotions import NUM_CLASSES
from splitfed.model import seeded
from splitfed.server import ServerIO
from splitfed.training import confusion, make_optimizer
from splitfed.wire import Message


class Centralized(SplitCNN):
    name = "centralized"
    mode = "local"
    uses_clients = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_opt = make_optimizer(self.client_net.parameters(), self.train_cfg)
        self.train_data: EmotionDataset | None = None
        self.eval_data: dict[str, EmotionDataset] = {}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.server_opt, self.client_opt]

    def attach_data(self, train: EmotionDataset, test: EmotionDataset) -> None:
        self.train_data = train
        self.eval_data = {"train": train, "test": test}

    # No devices and no messages: the round is one loop here, so the hooks are not used.
    def configure_round(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        raise NotImplementedError("centralized training has no devices to configure")

    def handle(self, io: ServerIO, state: RoundState, msg: Message) -> None:
        raise NotImplementedError("centralized training receives no messages")

    def aggregate(self, io: ServerIO, state: RoundState) -> RoundTrain:
        raise NotImplementedError("centralized training has nothing to aggregate")

    def run_round(
        self, io: ServerIO | None, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        assert self.train_data is not None, "attach_data first"
        cfg = self.train_cfg
        result = RoundTrain(completed=["centralized"])
        self.client_net.train()
        self.server_net.train()
        batches = iterate_batches(
            self.train_data,
            cfg.batch_size,
            (self.seed, rnd, 0),
            cfg.local_epochs,
            train=True,
            augment=cfg.augment,
            jitter=cfg.jitter,
        )
        for step, (x, y) in enumerate(batches):
            with seeded(self.seed, rnd, 0, step, 0):
                h = self.client_net(x)
            with seeded(self.seed, rnd, 0, step, 1):
                out = self.server_net(h)
            loss = self.loss_fn(out, y)
            self.client_opt.zero_grad(set_to_none=True)
            self.server_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.client_opt.step()
            self.server_opt.step()
            result.add(loss.item(), int((out.argmax(1) == y).sum()), len(y))
        self.version += 1
        return result

    def evaluate(
        self, io: ServerIO | None, participants: list[str], split: str, timeout: float
    ) -> np.ndarray:
        conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        self.client_net.eval()
        self.server_net.eval()
        with torch.no_grad():
            for x, y in iterate_batches(self.eval_data[split], 256, (0,), train=False):
                conf += confusion(y.numpy(), self.server_net(self.client_net(x)).argmax(1).numpy())
        return conf

    def state(self) -> dict[str, Any]:
        s = super().state()
        s["client_opt"] = self.client_opt.state_dict()
        return s

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.client_opt.load_state_dict(state["client_opt"])
