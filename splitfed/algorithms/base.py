"""What every algorithm shares: the global model, round configuration, server steps, evaluation.

An algorithm is a strategy object (as in Flower): `run_round` holds its round logic and talks
only to `ServerIO`; the aggregation arithmetic lives in `aggregate.py`.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from splitfed.client import CLIENT_PREFIX, SERVER_PREFIX
from splitfed.config import TrainConfig, round_lr
from splitfed.emotions import NUM_CLASSES
from splitfed.model import ModelConfig, build_split_model, seeded
from splitfed.server import Presence, ServerIO
from splitfed.training import make_optimizer, prefixed, set_lr, state_to_numpy
from splitfed.wire import Message, MsgType, pack_gradients, unpack_activations

log = logging.getLogger(__name__)


@dataclass
class RoundTrain:
    """What one round of training produced, as counts the runner turns into metrics."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    completed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def add(self, loss: float, correct: int, n: int) -> None:
        self.loss_sum += loss * n
        self.correct += correct
        self.seen += n


class Algorithm(abc.ABC):
    """Base of all strategies; holds the global client and server halves."""

    name: ClassVar[str]
    mode: ClassVar[Literal["split", "local"]] = "split"
    uses_clients: ClassVar[bool] = True

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int) -> None:
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.seed = seed
        self.client_net, self.server_net = build_split_model(model_cfg, seed)
        self.server_opt = make_optimizer(self.server_net.parameters(), train_cfg)
        self.loss_fn = nn.CrossEntropyLoss()
        self.version = 0
        self.indices: dict[str, int] = {}
        self.total_rounds = 1
        self.lr = train_cfg.lr

    def start_round(self, rnd: int, total_rounds: int) -> None:
        """Set this round's learning rate on every optimizer the aggregator holds."""
        self.total_rounds = total_rounds
        self.lr = round_lr(self.train_cfg, rnd, total_rounds)
        for opt in self.optimizers():
            set_lr(opt, self.lr)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.server_opt]

    # ---- membership and configuration ---------------------------------------------------------

    def client_index(self, client_id: str) -> int:
        """A stable index per client (sorted ids at the first round, then in order of joining)."""
        if client_id not in self.indices:
            self.indices[client_id] = len(self.indices)
        return self.indices[client_id]

    def enrol(self, client_ids: list[str]) -> None:
        for cid in sorted(client_ids):
            self.client_index(cid)

    def round_body(self, client_id: str, **extra: Any) -> dict[str, Any]:
        return {
            "algo": self.name,
            "mode": self.mode,
            "seed": self.seed,
            "client_index": self.client_index(client_id),
            "model": self.model_cfg.model_dump(mode="json"),
            "train": self.train_cfg.model_dump(mode="json"),
            "weights_version": self.version,
            "lr": self.lr,
            **extra,
        }

    def global_tensors(self, full: bool = False) -> dict[str, np.ndarray]:
        t = prefixed(state_to_numpy(self.client_net), CLIENT_PREFIX)
        if full:
            t.update(prefixed(state_to_numpy(self.server_net), SERVER_PREFIX))
        return t

    @abc.abstractmethod
    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        """Train one round with these clients; update the global halves."""

    # ---- shared steps -------------------------------------------------------------------------

    def server_step(
        self, net: nn.Module, opt: torch.optim.Optimizer, msg: Message, rnd: int
    ) -> tuple[np.ndarray, float, int, int]:
        """One server-half step on a batch of smashed data; returns the activation gradient."""
        act = torch.from_numpy(unpack_activations(msg.tensors)).requires_grad_(True)
        y = torch.from_numpy(msg.tensors["labels"])
        if int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES:
            raise ValueError("label out of range")
        step = int(msg.env.body["step"])
        net.train()
        with seeded(self.seed, rnd, self.client_index(msg.src), step, 1):
            out = net(act)
        loss = self.loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert act.grad is not None
        correct = int((out.argmax(1) == y).sum())
        return act.grad.numpy(), loss.item(), correct, len(y)

    def reply_gradients(self, io: ServerIO, msg: Message, grad: np.ndarray, loss: float) -> None:
        tensors = pack_gradients(grad, self.train_cfg.grad_compression)
        body = {"step": int(msg.env.body["step"]), "loss": loss}
        io.send(msg.src, MsgType.GRADIENTS, body, tensors, reply_to=msg.env.message_id)

    def collect(
        self,
        io: ServerIO,
        active: set[str],
        deadline: float,
        on_message: Callable[[Message], None],
        what: str,
        on_drop: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Feed messages from `active` clients to `on_message` until none is left active.

        `on_message` removes a client from `active` when it is done. A client that goes offline
        or re-joins (it lost its state) is dropped; at the deadline the rest are dropped.
        Returns the dropped clients, so the round can finish with those that did.
        """
        dropped: list[str] = []

        def drop(cid: str) -> None:
            active.discard(cid)
            dropped.append(cid)
            if on_drop is not None:
                on_drop(cid)

        while active:
            ev = io.next(deadline)
            if ev is None:
                log.warning("%s: timed out waiting for %s", what, ", ".join(sorted(active)))
                dropped.extend(sorted(active))
                active.clear()
                break
            if isinstance(ev, Presence):
                if ev.state != "online" and ev.client_id in active:
                    log.warning(
                        "%s: %s went %s; finishing without it", what, ev.client_id, ev.state
                    )
                    drop(ev.client_id)
                continue
            if ev.type in (MsgType.JOIN, MsgType.LEAVE):
                if ev.src in active:
                    log.warning(
                        "%s: %s %s mid-round; finishing without it", what, ev.src, ev.type.value
                    )
                    drop(ev.src)
                continue
            if ev.type is MsgType.PREDICT:
                self.answer_predict(io, ev)
                continue
            if ev.src not in active:
                continue
            try:
                on_message(ev)
            except (ValueError, KeyError, RuntimeError) as e:
                log.warning("%s: bad %s from %s dropped: %s", what, ev.type.value, ev.src, e)
                io.rejected["semantic"] += 1
        return dropped

    # ---- evaluation ---------------------------------------------------------------------------

    def predict(self, act: np.ndarray) -> np.ndarray:
        """Server-half logits for smashed data, in eval mode."""
        self.server_net.eval()
        with torch.no_grad():
            return self.server_net(torch.from_numpy(act)).numpy()

    def answer_predict(self, io: ServerIO, msg: Message) -> None:
        """Live mode: answer one frame's smashed data with the predicted emotion."""
        logits = self.predict(unpack_activations(msg.tensors))
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
        body = {"frame": int(msg.env.body["frame"]), "classes": probs.argmax(1).tolist()}
        io.send(
            msg.src,
            MsgType.PREDICTION,
            body,
            {"probs": probs.astype(np.float32)},
            reply_to=msg.env.message_id,
            round=msg.env.round,
        )

    def evaluate(
        self, io: ServerIO, participants: list[str], split: str, timeout: float
    ) -> np.ndarray:
        """Confusion counts over the clients' own data; labels never leave the devices."""
        conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        full = self.mode == "local"
        tensors = self.global_tensors(full=full)
        for cid in participants:
            io.send(cid, MsgType.EVAL_REQUEST, self.round_body(cid, split=split), tensors)

        def on_message(msg: Message) -> None:
            nonlocal conf
            if msg.type is MsgType.EVAL_SMASHED and msg.env.body["split"] == split:
                pred = self.predict(unpack_activations(msg.tensors)).argmax(1).astype(np.int64)
                body = {"split": split, "step": int(msg.env.body["step"])}
                io.send(
                    msg.src,
                    MsgType.EVAL_PREDICTIONS,
                    body,
                    {"pred": pred},
                    reply_to=msg.env.message_id,
                )
            elif msg.type is MsgType.EVAL_RESULT and msg.env.body["split"] == split:
                conf += np.asarray(msg.env.body["confusion"], dtype=np.int64)
                active.discard(msg.src)

        active = set(participants)
        self.collect(io, active, time.monotonic() + timeout, on_message, f"evaluation ({split})")
        return conf

    # ---- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "client": self.client_net.state_dict(),
            "server": self.server_net.state_dict(),
            "server_opt": self.server_opt.state_dict(),
            "version": self.version,
            "indices": dict(self.indices),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.client_net.load_state_dict(state["client"])
        self.server_net.load_state_dict(state["server"])
        self.server_opt.load_state_dict(state["server_opt"])
        self.version = int(state["version"])
        self.indices = dict(state["indices"])
