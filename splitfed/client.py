"""The device side of every algorithm, as a reactive state machine.

`ClientRuntime.handle_bytes` takes one message from the aggregator and returns the messages to
send back. The in-process simulator calls it directly; the MQTT edge agent calls it from its
network loop. Both therefore run exactly this code, and only the delivery differs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from splitfed.config import TrainConfig
from splitfed.data.batches import iterate_batches
from splitfed.data.dataset import EmotionDataset
from splitfed.device import DeviceRuntime
from splitfed.model import (
    ClientNet,
    ModelConfig,
    ServerNet,
    build_split_model,
    seeded,
    smashed_shape,
)
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
    activation_spec,
    encode,
    pack_activations,
    weights_spec,
)

log = logging.getLogger(__name__)

CLIENT_PREFIX = "w."
SERVER_PREFIX = "s."
EVAL_BATCH = 256


@dataclass
class _Round:
    round: int
    seed: int
    index: int
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    step: int = 0
    samples: int = 0
    pending: tuple[int, torch.Tensor] | None = None  # (step, activations with graph)


@dataclass
class _Eval:
    round: int
    split: str
    labels: dict[int, np.ndarray] = field(default_factory=dict)
    conf: np.ndarray | None = None
    expected: int = 0


class ClientRuntime(DeviceRuntime):
    """Holds the local data, the client half and its optimizer; never sends an image."""

    def __init__(
        self,
        client_id: str,
        run_id: str,
        train: EmotionDataset,
        test: EmotionDataset | None = None,
        aggregator_id: str = "aggregator",
    ) -> None:
        self.client_id = client_id
        self.train = train
        self.test = test
        self.aggregator_id = aggregator_id
        self.seq = Sequencer(client_id, run_id)
        self.model_cfg: ModelConfig | None = None
        self.train_cfg: TrainConfig | None = None
        self.client_net: ClientNet | None = None
        self.server_net: ServerNet | None = None  # only for algorithms that train the full model
        self.opt: torch.optim.Optimizer | None = None
        self.full_opt: torch.optim.Optimizer | None = None
        self.weights_version = -1
        self.round: _Round | None = None
        self.evals: dict[str, _Eval] = {}
        self.rejected = 0
        self._max_round = 0
        self._spec_cache: dict[str, tuple[dict, dict]] = {}  # type: ignore[type-arg]
        self._validator = Validator(
            run_id,
            {
                MsgType.ROUND_START: self._weights_spec,
                MsgType.EVAL_REQUEST: self._weights_spec,
                MsgType.GLOBAL_WEIGHTS: self._weights_spec,
                MsgType.GRADIENTS: self._grad_spec,
                MsgType.EVAL_PREDICTIONS: {"pred": (frozenset({"I64"}), (-1,))},
            },
            known_sender=lambda src: src == aggregator_id,
            round_ok=self._round_ok,
        )

    def _weights_spec(self, env: Envelope) -> ShapeSpec:
        model_json = json.dumps(env.body["model"], sort_keys=True)
        if model_json not in self._spec_cache:
            cfg = ModelConfig.model_validate(env.body["model"])
            client, server = build_split_model(cfg, 0)
            self._spec_cache[model_json] = (
                weights_spec(state_to_numpy(client), CLIENT_PREFIX),
                weights_spec(state_to_numpy(server), SERVER_PREFIX),
            )
        client_spec, server_spec = self._spec_cache[model_json]
        if env.body.get("mode") == "local" and env.type is not MsgType.GLOBAL_WEIGHTS:
            return {**client_spec, **server_spec}
        return client_spec

    def _grad_spec(self, env: Envelope) -> ShapeSpec:
        if self.model_cfg is None:
            raise ValueError("gradients before any round started")
        return {"grad": (frozenset({"F32", "F16"}), (-1, *smashed_shape(self.model_cfg)))}

    # ---- protocol -----------------------------------------------------------------------------

    def join(self) -> bytes:
        counts = np.bincount(self.train.labels, minlength=7).tolist()
        body = {
            "client_id": self.client_id,
            "n_train": len(self.train),
            "n_test": 0 if self.test is None else len(self.test),
            "class_counts": counts,
            "input_shape": list(self.train.input_shape),
        }
        return encode(self.seq.make(MsgType.JOIN, 0, body))

    def handle(self, msg: Message) -> list[Message]:
        handlers = {
            MsgType.ROUND_START: self._on_round_start,
            MsgType.GRADIENTS: self._on_gradients,
            MsgType.EVAL_REQUEST: self._on_eval_request,
            MsgType.EVAL_PREDICTIONS: self._on_eval_predictions,
            MsgType.GLOBAL_WEIGHTS: self._on_global_weights,
        }
        return handlers[msg.type](msg)

    # ---- model set-up -------------------------------------------------------------------------

    def _configure(self, body: dict) -> None:  # type: ignore[type-arg]
        model_cfg = ModelConfig.model_validate(body["model"])
        train_cfg = TrainConfig.model_validate(body["train"])
        if tuple(model_cfg.input_shape) != self.train.input_shape:
            raise ValueError(
                f"model input {model_cfg.input_shape} != local crops {self.train.input_shape}"
            )
        if self.model_cfg != model_cfg or self.client_net is None:
            self.client_net, self.server_net = build_split_model(model_cfg, body["seed"])
            self.opt = make_optimizer(self.client_net.parameters(), train_cfg)
            self.full_opt = None
        self.model_cfg, self.train_cfg = model_cfg, train_cfg

    def _load(self, msg: Message) -> None:
        assert self.client_net is not None and self.server_net is not None
        if any(k.startswith(CLIENT_PREFIX) for k in msg.tensors):
            load_numpy_state(self.client_net, unprefixed(msg.tensors, CLIENT_PREFIX))
        if any(k.startswith(SERVER_PREFIX) for k in msg.tensors):
            load_numpy_state(self.server_net, unprefixed(msg.tensors, SERVER_PREFIX))
        self.weights_version = int(msg.env.body.get("weights_version", self.weights_version))

    # ---- training -----------------------------------------------------------------------------

    def _on_round_start(self, msg: Message) -> list[Message]:
        body = msg.env.body
        self._configure(body)
        self._load(msg)
        assert self.train_cfg is not None
        cfg = self.train_cfg
        lr = float(body.get("lr", cfg.lr))
        if not 0 <= lr <= 10:
            raise ValueError(f"learning rate {lr} out of range")
        if body["mode"] == "local" and self.full_opt is None and self.server_net is not None:
            # Separate optimizers per half equal one over both: Adam and SGD act per parameter.
            self.full_opt = make_optimizer(self.server_net.parameters(), cfg)
        set_lr(self.opt, lr)
        set_lr(self.full_opt, lr)
        key = (int(body["seed"]), msg.env.round, int(body["client_index"]))
        batches = iterate_batches(
            self.train,
            cfg.batch_size,
            key,
            cfg.local_epochs,
            train=True,
            augment=cfg.augment,
            jitter=cfg.jitter,
        )
        self.round = _Round(msg.env.round, key[0], key[2], batches)
        if body["mode"] == "local":
            return [self._train_locally(msg)]
        return [self._next_smashed(msg.env.message_id)]

    def _next_smashed(self, reply_to: str) -> Message:
        r = self.round
        assert r is not None and self.client_net is not None and self.train_cfg is not None
        try:
            x, y = next(r.batches)
        except StopIteration:
            return self._update_message(reply_to, {})
        self.client_net.train()
        with seeded(r.seed, r.round, r.index, r.step, 0):
            act = self.client_net(x)
        r.pending = (r.step, act)
        r.samples += len(y)
        tensors = pack_activations(act.detach().numpy(), self.train_cfg.compression)
        tensors["labels"] = y.numpy()
        body = {"step": r.step, "client_index": r.index}
        return self.seq.make(MsgType.SMASHED, r.round, body, tensors, reply_to=reply_to)

    def _on_gradients(self, msg: Message) -> list[Message]:
        r = self.round
        if r is None or r.pending is None or r.round != msg.env.round:
            raise ValueError("gradients without a batch in flight")
        step, act = r.pending
        if int(msg.env.body.get("step", -1)) != step:
            raise ValueError(f"gradients for step {msg.env.body.get('step')}, expected {step}")
        grad = torch.from_numpy(msg.tensors["grad"].astype(np.float32))
        if grad.shape != act.shape:
            raise ValueError(
                f"gradient shape {tuple(grad.shape)} != activations {tuple(act.shape)}"
            )
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        act.backward(grad)
        self.opt.step()
        r.pending = None
        r.step += 1
        return [self._next_smashed(msg.env.message_id)]

    def _update_message(self, reply_to: str, extra: dict) -> Message:  # type: ignore[type-arg]
        r = self.round
        assert r is not None and self.client_net is not None
        tensors = prefixed(state_to_numpy(self.client_net), CLIENT_PREFIX)
        if extra.get("full"):
            assert self.server_net is not None
            tensors.update(prefixed(state_to_numpy(self.server_net), SERVER_PREFIX))
        body = {"n_samples": len(self.train), "steps": r.step, "seen": r.samples, **extra}
        self.round = None
        return self.seq.make(MsgType.CLIENT_UPDATE, r.round, body, tensors, reply_to=reply_to)

    def _train_locally(self, msg: Message) -> Message:
        """FedAvg: the whole model trains on the device, with the same arithmetic as a split."""
        r = self.round
        assert r is not None and self.client_net is not None and self.server_net is not None
        assert self.train_cfg is not None
        assert self.opt is not None and self.full_opt is not None
        loss_fn = nn.CrossEntropyLoss()
        self.client_net.train()
        self.server_net.train()
        loss_sum, correct = 0.0, 0
        for x, y in r.batches:
            with seeded(r.seed, r.round, r.index, r.step, 0):
                h = self.client_net(x)
            with seeded(r.seed, r.round, r.index, r.step, 1):
                out = self.server_net(h)
            loss = loss_fn(out, y)
            self.opt.zero_grad(set_to_none=True)
            self.full_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.full_opt.step()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            r.samples += len(y)
            r.step += 1
        extra = {"full": True, "loss_sum": loss_sum, "correct": correct}
        return self._update_message(msg.env.message_id, extra)

    # ---- evaluation ---------------------------------------------------------------------------

    def _eval_data(self, split: str) -> EmotionDataset | None:
        return self.train if split == "train" else self.test

    def _on_eval_request(self, msg: Message) -> list[Message]:
        body = msg.env.body
        self._configure(body)
        self._load(msg)
        split = str(body["split"])
        ds = self._eval_data(split)
        assert (
            self.client_net is not None
            and self.server_net is not None
            and self.train_cfg is not None
        )
        out: list[Message] = []
        if ds is None or len(ds) == 0:
            body_r = {"split": split, "confusion": np.zeros((7, 7), int).tolist()}
            return [
                self.seq.make(
                    MsgType.EVAL_RESULT, msg.env.round, body_r, reply_to=msg.env.message_id
                )
            ]
        self.client_net.eval()
        batches = list(iterate_batches(ds, EVAL_BATCH, (0,), train=False))
        if body.get("mode") == "local":
            self.server_net.eval()
            conf = np.zeros((7, 7), dtype=np.int64)
            with torch.no_grad():
                for x, y in batches:
                    pred = self.server_net(self.client_net(x)).argmax(1).numpy()
                    conf += confusion(y.numpy(), pred)
            body_r = {"split": split, "confusion": conf.tolist()}
            return [
                self.seq.make(
                    MsgType.EVAL_RESULT, msg.env.round, body_r, reply_to=msg.env.message_id
                )
            ]
        ev = _Eval(
            msg.env.round, split, expected=len(batches), conf=np.zeros((7, 7), dtype=np.int64)
        )
        self.evals[split] = ev
        with torch.no_grad():
            for step, (x, y) in enumerate(batches):
                ev.labels[step] = y.numpy()
                tensors = pack_activations(self.client_net(x).numpy(), self.train_cfg.compression)
                b = {"split": split, "step": step, "steps": len(batches)}
                out.append(
                    self.seq.make(
                        MsgType.EVAL_SMASHED, msg.env.round, b, tensors, reply_to=msg.env.message_id
                    )
                )
        return out

    def _on_eval_predictions(self, msg: Message) -> list[Message]:
        split = str(msg.env.body["split"])
        ev = self.evals.get(split)
        step = int(msg.env.body["step"])
        if ev is None or step not in ev.labels or ev.round != msg.env.round:
            raise ValueError(f"predictions for unknown eval step {split}/{step}")
        y = ev.labels.pop(step)
        pred = msg.tensors["pred"]
        if pred.shape != y.shape:
            raise ValueError("prediction count does not match the batch")
        assert ev.conf is not None
        ev.conf += confusion(y, pred.astype(np.int64))
        if ev.labels:
            return []
        del self.evals[split]
        body = {"split": split, "confusion": ev.conf.tolist()}
        return [
            self.seq.make(MsgType.EVAL_RESULT, msg.env.round, body, reply_to=msg.env.message_id)
        ]

    def _on_global_weights(self, msg: Message) -> list[Message]:
        if self.client_net is None:
            self._configure(msg.env.body)
        self._load(msg)
        return []

    def smashed_shape(self) -> tuple[int, int, int]:
        assert self.model_cfg is not None
        return smashed_shape(self.model_cfg)

    def activation_spec(self) -> dict:  # type: ignore[type-arg]
        assert self.train_cfg is not None
        return activation_spec(self.train_cfg.compression, self.smashed_shape())
