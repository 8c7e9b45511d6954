"""What the split-CNN algorithms share (centralized, FedAvg, SL, SFLV1, SFLV2).

One global model cut in two halves, a server step on smashed data, evaluation through the
devices' client halves, live predictions, and checkpoints of both halves.

A U-shaped split (`ModelConfig.shape == "u"`, for SL, SFLV1 and SFLV2) turns the server step
into two messages: SMASHED (no labels) -> FEATURES (the server half's output) -> the device's
head and loss -> FEATURE_GRADS -> the server half steps -> GRADIENTS. The aggregator keeps the
averaged head (`server_net.fc`) for checkpoints and live predictions, but never a label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from splitfed.algorithms.base import ClientUpdate, RoundState, RoundTrain, Strategy
from splitfed.checkpoint import load_init
from splitfed.client import CLIENT_PREFIX, HEAD_PREFIX, SERVER_PREFIX
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.defences import DefenceConfig
from splitfed.emotions import NUM_CLASSES
from splitfed.errors import UserError
from splitfed.model import ModelConfig, ServerNet, build_split_model, seeded
from splitfed.server import ServerIO
from splitfed.training import load_numpy_state, make_optimizer, prefixed, state_to_numpy
from splitfed.wire import Message, MsgType, pack_gradients, unpack_activations

# The algorithms that send smashed data: the ones defences act on and that can be U-shaped.
SMASHED_ALGORITHMS = ("sl", "sflv1", "sflv2")


class StepGroup:
    """Batches whose gradients make one optimizer step together (SFLV2 in lockstep).

    The half does not change within a group, so every batch's activation gradient is the one
    a single step on their union would give; the step takes the sample-weighted mean of the
    batches' parameter gradients, the gradient of the union's mean loss. A group of one batch
    steps on that batch's own gradient, bit for bit the step of a batch outside any group.
    """

    def __init__(self) -> None:
        self.sums: list[torch.Tensor | None] | None = None  # n x gradient, per parameter
        self.n = 0

    def add(self, opt: torch.optim.Optimizer, n: int, last: bool) -> None:
        """Take the batch of `n` samples whose gradients `opt`'s parameters hold now."""
        if self.sums is None and last:
            opt.step()
            return
        grads = [None if p.grad is None else p.grad * n for p in _params(opt)]
        if self.sums is None:
            self.sums = grads
        else:
            self.sums = [
                g if s is None else s if g is None else s.add_(g)
                for s, g in zip(self.sums, grads, strict=True)
            ]
        self.n += n
        if last:
            self.close(opt)

    def close(self, opt: torch.optim.Optimizer) -> None:
        """Step on what the group holds (its last batch came, or its device is gone)."""
        if self.sums is None:
            return
        for p, s in zip(_params(opt), self.sums, strict=True):
            p.grad = None if s is None else s.div_(self.n)
        opt.step()
        self.sums, self.n = None, 0


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _step(opt: torch.optim.Optimizer, n: int, group: StepGroup | None, last: bool) -> None:
    if group is None:
        opt.step()
    else:
        group.add(opt, n, last)


@dataclass
class _UStep:
    """A U-shaped batch in flight: the server forward is done, the head's gradient is due."""

    step: int
    act: torch.Tensor  # the device's activations, a leaf that collects their gradient
    features: torch.Tensor  # the server half's output, with its graph
    opt: torch.optim.Optimizer
    group: StepGroup | None  # lockstep: the step is the group's, `last` closes it
    last: bool


class SplitCNN(Strategy):
    """Base of the algorithms of the split CNN; holds the global client and server halves."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        seed: int,
        aggregation: AggregationConfig | None = None,
    ) -> None:
        super().__init__(train_cfg, seed, aggregation)
        if model_cfg.shape == "u" and self.name not in SMASHED_ALGORITHMS:
            raise UserError(
                f"--shape u needs an algorithm with smashed data: {', '.join(SMASHED_ALGORITHMS)}"
                f" (not {self.name})"
            )
        self.model_cfg: ModelConfig = model_cfg
        # Noise and NoPeek, sent to the devices with every round; they apply them (see
        # splitfed.client). Cut, bottleneck and compression are in model_cfg and train_cfg.
        self.defence = DefenceConfig()
        self.pending: dict[str, _UStep] = {}  # U-shape: per device, the batch in flight
        self.client_net, self.server_net = build_split_model(model_cfg, seed)
        self.server_opt = make_optimizer(self.server_net.parameters(), train_cfg)
        self.loss_fn = nn.CrossEntropyLoss()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.server_opt]

    @property
    def ushaped(self) -> bool:
        return self.model_cfg.shape == "u"

    def start_round(self, rnd: int, total_rounds: int, devices: int = 1) -> None:
        super().start_round(rnd, total_rounds, devices)
        self.pending.clear()
        if self.fed is not None:  # the devices train from the fed server's current half
            self.fed.sync(self)

    def update_nets(self) -> dict[str, nn.Module]:
        """The parts a device trains and sends back, by prefix: its half, and the head (U)."""
        nets: dict[str, nn.Module] = {CLIENT_PREFIX: self.client_net}
        if self.ushaped:
            nets[HEAD_PREFIX] = self.server_net.fc
        return nets

    def load_update(self, update: ClientUpdate) -> None:
        """Take one device's parts as the global ones (SL relays them, nothing is averaged)."""
        for prefix, net in self.update_nets().items():
            load_numpy_state(net, update.halves[prefix])

    def start_from(self, path: Path) -> None:
        """Both halves from a checkpoint (`--init-from`), before the first round.

        Copied in place, so the optimizers stay bound to the parameters; devices get these
        weights with their first round, as they get every global model.
        """
        client, server = load_init(path, self.model_cfg)
        self.client_net.load_state_dict(client.state_dict())
        self.server_net.load_state_dict(server.state_dict())

    # ---- configuration ----------------------------------------------------------------------

    def round_body(self, client_id: str, **extra: Any) -> dict[str, Any]:
        return {
            "algo": self.name,
            "mode": self.mode,
            "seed": self.seed,
            "client_index": self.client_index(client_id),
            "model": self.model_cfg.model_dump(mode="json"),
            "train": self.device_train_cfg.model_dump(mode="json"),
            "weights_version": self.version,
            "lr": self.lr,
            "defence": self.defence.model_dump(mode="json", include={"noise", "nopeek"}),
            **({"fed_server": True} if self.fed is not None else {}),
            **extra,
        }

    def global_tensors(self, full: bool = False) -> dict[str, np.ndarray]:
        if self.fed is not None:
            return {}  # the devices get the client half from the fed server
        t = prefixed(state_to_numpy(self.client_net), CLIENT_PREFIX)
        if full:
            t.update(prefixed(state_to_numpy(self.server_net), SERVER_PREFIX))
        elif self.ushaped:
            t.update(prefixed(state_to_numpy(self.server_net.fc), HEAD_PREFIX))
        return t

    def start_clients(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        """ROUND_START with the global weights to every participant at once."""
        tensors = self.global_tensors(full=self.mode == "local")
        for cid in participants:
            io.send(cid, MsgType.ROUND_START, self.round_body(cid), tensors)
        return RoundState(rnd, list(participants), set(participants))

    # ---- the server step --------------------------------------------------------------------

    def server_step(
        self,
        net: nn.Module,
        opt: torch.optim.Optimizer,
        msg: Message,
        rnd: int,
        group: StepGroup | None = None,
        last: bool = True,
    ) -> tuple[np.ndarray, float, int, int]:
        """One server-half step on a batch of smashed data; returns the activation gradient.

        With a `group` the batch joins it, and the step is the group's (`StepGroup`)."""
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
        _step(opt, len(y), group, last)
        assert act.grad is not None
        correct = int((out.argmax(1) == y).sum())
        return act.grad.numpy(), loss.item(), correct, len(y)

    def train_batch(
        self,
        io: ServerIO,
        state: RoundState,
        msg: Message,
        net: nn.Module,
        opt: torch.optim.Optimizer,
        result: RoundTrain,
        group: StepGroup | None = None,
        last: bool = True,
    ) -> None:
        """Step `net` on one SMASHED batch, answer its gradient, count what the device trained
        into `result`. U-shape: answer the features; `finish_batch` completes the step. With a
        `group` the step is the group's, taken when its `last` batch is in."""
        if self.ushaped:
            self._start_ushaped(io, state, msg, net, opt, group, last)
            return
        grad, loss, correct, n = self.server_step(net, opt, msg, state.rnd, group, last)
        state.trained[msg.src] += n
        tensors = pack_gradients(grad, self.train_cfg.grad_compression)
        body = {"step": int(msg.env.body["step"]), "loss": loss}
        io.send(msg.src, MsgType.GRADIENTS, body, tensors, reply_to=msg.env.message_id)
        result.add(loss, correct, n)

    def _start_ushaped(
        self,
        io: ServerIO,
        state: RoundState,
        msg: Message,
        net: nn.Module,
        opt: torch.optim.Optimizer,
        group: StepGroup | None,
        last: bool,
    ) -> None:
        if msg.src in self.pending:
            raise ValueError("a new batch before the head's gradient of the last one")
        assert isinstance(net, ServerNet)
        act = torch.from_numpy(unpack_activations(msg.tensors)).requires_grad_(True)
        step = int(msg.env.body["step"])
        net.train()
        with seeded(self.seed, state.rnd, self.client_index(msg.src), step, 1):
            features = net.features(act)
        self.pending[msg.src] = _UStep(step, act, features, opt, group, last)
        state.trained[msg.src] += len(act)
        io.send(
            msg.src,
            MsgType.FEATURES,
            {"step": step},
            {"features": features.detach().numpy().astype(np.float32)},
            reply_to=msg.env.message_id,
        )

    def finish_batch(
        self, io: ServerIO, state: RoundState, msg: Message, result: RoundTrain
    ) -> None:
        """U-shape: FEATURE_GRADS came; step the server half and answer the activation grad."""
        p = self.pending.get(msg.src)
        step = int(msg.env.body["step"])
        if p is None or p.step != step:
            raise ValueError(f"head gradient for step {step}, none in flight")
        grad = torch.from_numpy(msg.tensors["grad"].astype(np.float32))
        if grad.shape != p.features.shape:
            raise ValueError(
                f"head gradient {tuple(grad.shape)} != features {tuple(p.features.shape)}"
            )
        del self.pending[msg.src]
        p.opt.zero_grad(set_to_none=True)
        p.features.backward(grad)
        _step(p.opt, len(p.act), p.group, p.last)
        assert p.act.grad is not None
        tensors = pack_gradients(p.act.grad.numpy(), self.train_cfg.grad_compression)
        io.send(msg.src, MsgType.GRADIENTS, {"step": step}, tensors, reply_to=msg.env.message_id)
        result.seen += len(p.act)

    def add_device_counts(
        self, state: RoundState, client_id: str, update: ClientUpdate, result: RoundTrain
    ) -> None:
        """U-shape: the loss and hits the device counted over the round (sums only)."""
        if not self.ushaped:
            return
        # The wire checked both (finite, non-negative, bounded); hits cannot outnumber samples.
        loss_sum = float(update.body.get("loss_sum", 0.0))
        correct = int(update.body.get("correct", 0))
        if correct > state.trained[client_id]:
            raise ValueError(f"{correct} correct of {state.trained[client_id]} samples trained")
        result.loss_sum += loss_sum
        result.correct += correct

    # ---- evaluation -------------------------------------------------------------------------

    def features(self, act: np.ndarray) -> np.ndarray:
        """Server-half features for smashed data, in eval mode (U-shaped evaluation)."""
        self.server_net.eval()
        with torch.no_grad():
            return self.server_net.features(torch.from_numpy(act)).numpy().astype(np.float32)

    def predict(self, act: np.ndarray) -> np.ndarray:
        """Server-half logits for smashed data, in eval mode."""
        self.server_net.eval()
        with torch.no_grad():
            return self.server_net(torch.from_numpy(act)).numpy()

    def on_predict(self, io: ServerIO, msg: Message) -> None:
        self.answer_predict(io, msg)

    def answer_predict(self, io: ServerIO, msg: Message) -> None:
        """Live mode: answer one frame's smashed data with the predicted emotion.

        U-shape: the device holds the head, so it gets the server half's features and
        finishes the prediction itself; no logit of a live frame goes on the wire."""
        if self.ushaped:
            features = self.features(unpack_activations(msg.tensors))
            body = {"frame": int(msg.env.body["frame"])}
            io.send(msg.src, MsgType.FEATURES, body, {"features": features},
                    reply_to=msg.env.message_id, round=msg.env.round)  # fmt: skip
            return
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
                act = unpack_activations(msg.tensors)
                if self.ushaped:  # the device holds the head: it gets the features
                    kind, out = MsgType.FEATURES, {"features": self.features(act)}
                else:
                    pred = self.predict(act).argmax(1).astype(np.int64)
                    kind, out = MsgType.EVAL_PREDICTIONS, {"pred": pred}
                body = {"split": split, "step": int(msg.env.body["step"])}
                io.send(msg.src, kind, body, out, reply_to=msg.env.message_id)
            elif msg.type is MsgType.EVAL_RESULT and msg.env.body["split"] == split:
                conf += np.asarray(msg.env.body["confusion"], dtype=np.int64)
                active.discard(msg.src)

        active = set(participants)
        self.collect(io, active, time.monotonic() + timeout, on_message, f"evaluation ({split})")
        return conf

    # ---- checkpoints ------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        # With a fed server this process holds the server half only; the fed server
        # checkpoints the client half.
        t = {} if self.fed is not None else prefixed(state_to_numpy(self.client_net), "client.")
        t.update(prefixed(state_to_numpy(self.server_net), "server."))
        return t

    def state(self) -> dict[str, Any]:
        client = {} if self.fed is not None else {"client": self.client_net.state_dict()}
        return {
            **client,
            "server": self.server_net.state_dict(),
            "server_opt": self.server_opt.state_dict(),
            "version": self.version,
            "indices": dict(self.indices),
            "server_opt_state": dict(self.server_opt_state),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if "client" in state and self.fed is None:
            self.client_net.load_state_dict(state["client"])
        self.server_net.load_state_dict(state["server"])
        self.server_opt.load_state_dict(state["server_opt"])
        self.version = int(state["version"])
        self.indices = dict(state["indices"])
        self.server_opt_state = dict(state.get("server_opt_state", {}))
