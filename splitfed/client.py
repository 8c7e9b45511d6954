"""The device side of every algorithm, as a reactive state machine.

`ClientRuntime.handle_bytes` takes one message from the aggregator and returns the messages to
send back. The in-process simulator calls it directly; the MQTT edge agent calls it from its
network loop. Both therefore run exactly this code, and only the delivery differs.

Everything that leaves the device as smashed data goes through `splitfed.defences.to_wire`
(client half -> noise -> compression), and the gradient comes back through `nopeek_backward`,
under the defence the round configures. The noise is keyed with this device's own secret,
which the aggregator never learns, so it cannot regenerate the noise and subtract it.

In a U-shaped split (`ModelConfig.shape == "u"`) the device also holds the classifier head
and the labels: the aggregator sends back the server half's features (FEATURES), the device
computes the loss and answers with its gradient (FEATURE_GRADS); no label and no logit of a
labelled sample leaves the device.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch
from torch import nn

from splitfed.config import TrainConfig
from splitfed.data.batches import iterate_batches, num_batches, part_bounds
from splitfed.data.dataset import EmotionDataset
from splitfed.defences import DefenceConfig, WireBatch, nopeek_backward, to_wire
from splitfed.device import DeviceRuntime
from splitfed.model import (
    ClientNet,
    ModelConfig,
    ServerNet,
    build_split_model,
    feature_dim,
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
    FED_SERVER_ID,
    Envelope,
    Message,
    MsgType,
    Sequencer,
    ShapeSpec,
    Validator,
    activation_spec,
    encode,
    pack_gradients,
    weights_spec,
)

log = logging.getLogger(__name__)

CLIENT_PREFIX = "w."
SERVER_PREFIX = "s."
HEAD_PREFIX = "h."  # U-shape: the classifier head (ServerNet.fc), which trains on the device
EVAL_BATCH = 256
EVAL_NOISE_STREAM = 1_000_000  # noise keys of evaluation batches, apart from training steps
LIVE_NOISE_STREAM = 2_000_000  # noise keys of live frames (PREDICT), apart from both


@dataclass
class _Round:
    round: int  # on the wire: counts the parts of cut rounds (Strategy.wire_round)
    seed: int
    index: int
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    step: int = 0  # within the whole round, so a part's steps keep the uncut round's seeds
    epoch: int = 0  # the round itself, which keys the batches and every seed
    samples: int = 0
    pending: tuple[int, torch.Tensor] | None = None  # (step, activations with graph)
    # What the backward step of the batch in flight needs: its crops (NoPeek), what went on
    # the wire, and (U-shape) its labels, kept here and never sent.
    x: torch.Tensor | None = None
    wire: WireBatch | None = None
    y: torch.Tensor | None = None
    head_done: bool = False  # U-shape: the head stepped, the client half's gradient is due
    loss_sum: float = 0.0  # U-shape: the device computes the loss, so it counts it
    correct: int = 0


@dataclass
class _Stream:
    """The round's batches, drawn once across its parts (`TrainConfig.syncs_per_round`)."""

    key: tuple[int, int, int]
    next: int
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]


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
        secret: int | None = None,
    ) -> None:
        """`secret` keys the activation noise; None draws a fresh one (OS randomness), which
        is what a device wants: it never leaves the device, so nobody can replay the noise."""
        self.client_id = client_id
        self.train = train
        self._stream: _Stream | None = None  # a cut round's batches, across its parts
        self.test = test
        self.aggregator_id = aggregator_id
        self.seq = Sequencer(client_id, run_id)
        self.model_cfg: ModelConfig | None = None
        self.train_cfg: TrainConfig | None = None
        self.client_net: ClientNet | None = None
        self.server_net: ServerNet | None = None  # only for algorithms that train the full model
        self.opt: torch.optim.Optimizer | None = None
        self.full_opt: torch.optim.Optimizer | None = None
        self.head_opt: torch.optim.Optimizer | None = None  # U-shape: the classifier head's
        self.defence = DefenceConfig()
        self.secret = secrets.randbits(62) if secret is None else int(secret)
        self.weights_version = -1
        self.round: _Round | None = None
        self.evals: dict[str, _Eval] = {}
        self.rejected = 0
        self._live_frames = 0  # live frames put on the wire: each one's noise key
        self._max_round = 0
        self._spec_cache: dict[str, tuple[dict, dict]] = {}  # type: ignore[type-arg]
        # With a separate fed server (the round says `fed_server`; once said, for good): the
        # client half comes from its GLOBAL_WEIGHTS and goes back to it alone, never to the
        # aggregator. A round or evaluation waits here until the version it names has come.
        self.fed_server = False
        self._fed_global: Message | None = None
        self._fed_deferred: list[Message] = []
        self._fed_outbox: list[Message] = []
        self._validator = Validator(
            run_id,
            {
                MsgType.ROUND_START: self._weights_spec,
                MsgType.EVAL_REQUEST: self._weights_spec,
                MsgType.GLOBAL_WEIGHTS: self._weights_spec,
                MsgType.GRADIENTS: self._grad_spec,
                MsgType.FEATURES: self._features_spec,
                MsgType.EVAL_PREDICTIONS: {"pred": (frozenset({"I64"}), (-1,))},
            },
            known_sender=lambda src: src in (aggregator_id, FED_SERVER_ID),
            round_ok=self._round_ok,
        )

    def _weights_spec(self, env: Envelope) -> ShapeSpec:
        if env.body.get("fed_server") and env.type is not MsgType.GLOBAL_WEIGHTS:
            return {}  # the client half comes from the fed server
        model_json = json.dumps(env.body["model"], sort_keys=True)
        if model_json not in self._spec_cache:
            cfg = ModelConfig.model_validate(env.body["model"])
            client, server = build_split_model(cfg, 0)
            client_spec = weights_spec(state_to_numpy(client), CLIENT_PREFIX)
            if cfg.shape == "u":  # the head travels with the client half
                client_spec.update(weights_spec(state_to_numpy(server.fc), HEAD_PREFIX))
            self._spec_cache[model_json] = (
                client_spec,
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

    def _features_spec(self, env: Envelope) -> ShapeSpec:
        if self.model_cfg is None or self.model_cfg.shape != "u":
            raise ValueError("features outside a U-shaped run")
        return {"features": (frozenset({"F32"}), (-1, feature_dim(self.model_cfg)))}

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
        if msg.src == FED_SERVER_ID or self.fed_server or msg.env.body.get("fed_server"):
            return self._fed_handle(msg)
        return self._handle(msg)

    def _handle(self, msg: Message) -> list[Message]:
        handlers = {
            MsgType.ROUND_START: self._on_round_start,
            MsgType.GRADIENTS: self._on_gradients,
            MsgType.FEATURES: self._on_features,
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
            self.head_opt = None
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        # Noise and NoPeek as the round asks; cut, bottleneck and compression are already in
        # the model and training settings. An aggregator that sends none gets none.
        self.defence = DefenceConfig.model_validate(body.get("defence") or {})

    @property
    def ushaped(self) -> bool:
        return self.model_cfg is not None and self.model_cfg.shape == "u"

    def _load(self, msg: Message) -> None:
        assert self.client_net is not None and self.server_net is not None
        if any(k.startswith(CLIENT_PREFIX) for k in msg.tensors):
            load_numpy_state(self.client_net, unprefixed(msg.tensors, CLIENT_PREFIX))
        if any(k.startswith(SERVER_PREFIX) for k in msg.tensors):
            load_numpy_state(self.server_net, unprefixed(msg.tensors, SERVER_PREFIX))
        if any(k.startswith(HEAD_PREFIX) for k in msg.tensors):
            load_numpy_state(self.server_net.fc, unprefixed(msg.tensors, HEAD_PREFIX))
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
        if self.ushaped and self.head_opt is None and self.server_net is not None:
            self.head_opt = make_optimizer(self.server_net.fc.parameters(), cfg)
        set_lr(self.opt, lr)
        set_lr(self.full_opt, lr)
        set_lr(self.head_opt, lr)
        rnd, part = divmod(msg.env.round, cfg.syncs_per_round)
        key = (int(body["seed"]), rnd, int(body["client_index"]))
        batches, first = self._part_batches(key, part)
        self.round = _Round(msg.env.round, key[0], key[2], batches, step=first, epoch=rnd)
        if body["mode"] == "local":
            return [self._train_locally(msg)]
        return [self._next_smashed(msg.env.message_id)]

    def _part_batches(
        self, key: tuple[int, int, int], part: int
    ) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
        """This part's batches of the round keyed `key`, and the round step of the first.

        A cut round's parts continue one stream, so each batch is drawn and augmented once; a
        device that lost it (it restarted mid-round) draws the round again and skips to its
        part, with the same pixels.
        """
        cfg = self.train_cfg
        assert cfg is not None

        def draw() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return iterate_batches(
                self.train, cfg.batch_size, key, cfg.local_epochs,
                train=True, augment=cfg.augment, jitter=cfg.jitter,
            )  # fmt: skip

        parts = cfg.syncs_per_round
        if parts == 1:
            self._stream = None
            return draw(), 0
        total = num_batches(len(self.train), cfg.batch_size) * cfg.local_epochs
        lo, hi = part_bounds(total, part, parts)
        stream = self._stream
        if stream is None or stream.key != key or stream.next != lo:
            stream = _Stream(key, lo, islice(draw(), lo, None))
        self._stream = stream

        def take() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            assert stream is not None
            for batch in islice(stream.batches, hi - lo):
                stream.next += 1
                yield batch

        return take(), lo

    def _next_smashed(self, reply_to: str) -> Message:
        r = self.round
        assert r is not None and self.client_net is not None and self.train_cfg is not None
        try:
            x, y = next(r.batches)
        except StopIteration:
            return self._update_message(reply_to, {})
        self.client_net.train()
        with seeded(r.seed, r.epoch, r.index, r.step, 0):
            wire = to_wire(
                self.client_net,
                x,
                self.defence,
                self.train_cfg.compression,
                (r.seed, r.epoch, r.index, r.step, self.secret),
            )
        r.pending = (r.step, wire.activations)
        r.x, r.wire, r.y, r.head_done = x, wire, y, False
        r.samples += len(y)
        tensors = dict(wire.tensors)
        if not self.ushaped:
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
        if self.ushaped and not r.head_done:
            raise ValueError("gradients before the features of the batch")
        grad = torch.from_numpy(msg.tensors["grad"].astype(np.float32))
        if grad.shape != act.shape:
            raise ValueError(
                f"gradient shape {tuple(grad.shape)} != activations {tuple(act.shape)}"
            )
        assert self.opt is not None and r.x is not None and r.wire is not None
        self.opt.zero_grad(set_to_none=True)
        nopeek_backward(r.x, r.wire, grad, self.defence)
        self.opt.step()
        r.pending, r.x, r.wire, r.y = None, None, None, None
        r.step += 1
        return [self._next_smashed(msg.env.message_id)]

    def _on_features(self, msg: Message) -> list[Message]:
        """U-shape: the server half's output. Training: head forward, loss, head step, and the
        loss gradient back; evaluation: the predictions, counted here."""
        if "split" in msg.env.body:
            pred = self._head_predict(msg.tensors["features"])
            return self._count_predictions(msg, pred)
        r = self.round
        if r is None or r.pending is None or r.round != msg.env.round or r.head_done:
            raise ValueError("features without a batch in flight")
        step = r.pending[0]
        if int(msg.env.body.get("step", -1)) != step:
            raise ValueError(f"features for step {msg.env.body.get('step')}, expected {step}")
        assert r.y is not None and self.server_net is not None and self.head_opt is not None
        assert self.train_cfg is not None
        feat = torch.from_numpy(msg.tensors["features"].astype(np.float32))
        if feat.shape[0] != len(r.y):
            raise ValueError(f"features for {feat.shape[0]} samples, the batch has {len(r.y)}")
        feat.requires_grad_(True)
        self.server_net.train()
        # The same seed as the server half's forward in a plain split: the head's dropout is the
        # half's only random draw, so the U-shape changes no arithmetic.
        with seeded(r.seed, r.epoch, r.index, step, 1):
            out = self.server_net.head(feat)
        loss = nn.functional.cross_entropy(out, r.y)
        self.head_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.head_opt.step()
        r.loss_sum += loss.item() * len(r.y)
        r.correct += int((out.argmax(1) == r.y).sum())
        r.head_done = True
        assert feat.grad is not None
        tensors = pack_gradients(feat.grad.numpy(), self.train_cfg.grad_compression)
        return [
            self.seq.make(
                MsgType.FEATURE_GRADS,
                r.round,
                {"step": step},
                tensors,
                reply_to=msg.env.message_id,
            )
        ]

    def _head_predict(self, features: np.ndarray) -> np.ndarray:
        assert self.server_net is not None
        self.server_net.eval()
        with torch.no_grad():
            out = self.server_net.head(torch.from_numpy(features.astype(np.float32)))
        return out.argmax(1).numpy().astype(np.int64)

    def _update_message(self, reply_to: str, extra: dict) -> Message:  # type: ignore[type-arg]
        r = self.round
        assert r is not None and self.client_net is not None
        tensors = prefixed(state_to_numpy(self.client_net), CLIENT_PREFIX)
        if extra.get("full"):
            assert self.server_net is not None
            tensors.update(prefixed(state_to_numpy(self.server_net), SERVER_PREFIX))
        elif self.ushaped:
            # The head, and the round's loss and hits: sums over the round, never per sample.
            assert self.server_net is not None
            tensors.update(prefixed(state_to_numpy(self.server_net.fc), HEAD_PREFIX))
            extra = {"loss_sum": r.loss_sum, "correct": r.correct, **extra}
        body = {"n_samples": len(self.train), "steps": r.step, "seen": r.samples, **extra}
        self.round = None
        if self.fed_server:
            # The half to the fed server (sent first), the counts alone to the aggregator.
            self._fed_outbox.append(self.seq.make(MsgType.CLIENT_UPDATE, r.round, body, tensors))
            tensors = {}
        return self.seq.make(MsgType.CLIENT_UPDATE, r.round, body, tensors, reply_to=reply_to)

    # ---- with a separate fed server -----------------------------------------------------------

    def _fed_handle(self, msg: Message) -> list[Message]:
        """The fed server's weights, and rounds and evaluations that wait for them."""
        if msg.src == FED_SERVER_ID:
            if msg.type is not MsgType.GLOBAL_WEIGHTS:
                raise ValueError(f"{msg.type.value} from the fed server")
            version = int(msg.env.body["weights_version"])
            if self._fed_global is not None and version <= self._fed_version(self._fed_global):
                return []  # a retained copy again (reconnect): never roll back mid-round
            self._fed_global = msg
            if self.client_net is not None and self.round is None:
                self._load(msg)  # for live frames; a round loads it again at its start
            ready = [m for m in self._fed_deferred if self._fed_version(m) == version]
            self._fed_deferred = [m for m in self._fed_deferred if self._fed_version(m) > version]
            out: list[Message] = []
            for m in ready:
                out.extend(self._fed_handle(m))
            return out
        if msg.type is MsgType.GLOBAL_WEIGHTS:
            return []  # the aggregator holds no client half to push
        if msg.type in (MsgType.ROUND_START, MsgType.EVAL_REQUEST):
            if not msg.env.body.get("fed_server"):
                raise ValueError(f"{msg.type.value} without the fed server, after one")
            self.fed_server = True
            have = self._fed_global
            if have is None or self._fed_version(have) != self._fed_version(msg):
                self._fed_deferred = [m for m in self._fed_deferred if m.type is not msg.type]
                self._fed_deferred.append(msg)
                return []
            # The fed server's client half in place of the one the aggregator would have sent.
            msg = Message(msg.env, {**have.tensors, **msg.tensors})
        out = self._handle(msg)
        sent, self._fed_outbox = self._fed_outbox, []
        return [*sent, *out]

    @staticmethod
    def _fed_version(msg: Message) -> int:
        return int(msg.env.body.get("weights_version", -1))

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
            with seeded(r.seed, r.epoch, r.index, r.step, 0):
                h = self.client_net(x)
            with seeded(r.seed, r.epoch, r.index, r.step, 1):
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
        seed = int(body.get("seed", 0))
        with torch.no_grad():
            for step, (x, y) in enumerate(batches):
                ev.labels[step] = y.numpy()
                key = (seed, msg.env.round, EVAL_NOISE_STREAM + step, self.secret)
                wire = to_wire(self.client_net, x, self.defence, self.train_cfg.compression, key)
                b = {"split": split, "step": step, "steps": len(batches)}
                out.append(
                    self.seq.make(
                        MsgType.EVAL_SMASHED,
                        msg.env.round,
                        b,
                        wire.tensors,
                        reply_to=msg.env.message_id,
                    )
                )
        return out

    def _on_eval_predictions(self, msg: Message) -> list[Message]:
        if self.ushaped:
            raise ValueError("predictions from the aggregator in a U-shaped run")
        return self._count_predictions(msg, msg.tensors["pred"])

    def _count_predictions(self, msg: Message, pred: np.ndarray) -> list[Message]:
        """Count one evaluation batch's predictions; the confusion once all have come."""
        split = str(msg.env.body["split"])
        ev = self.evals.get(split)
        step = int(msg.env.body["step"])
        if ev is None or step not in ev.labels or ev.round != msg.env.round:
            raise ValueError(f"predictions for unknown eval step {split}/{step}")
        y = ev.labels[step]
        if pred.shape != y.shape:
            raise ValueError("prediction count does not match the batch")
        del ev.labels[step]
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

    # ---- live frames --------------------------------------------------------------------------

    def live_configured(self) -> bool:
        """Whether the aggregator has said how smashed data leaves this run (defence, wire)."""
        return self.model_cfg is not None and self.train_cfg is not None

    def live_wire(self, activations: np.ndarray) -> dict[str, np.ndarray]:
        """A live frame's smashed data as the run's defence lets it leave the device.

        The client half has already run (torch or ONNX, on the live thread); `to_wire` with an
        identity in its place adds the noise, keyed by this device's secret and a count of
        live frames, and compresses: the same path as every training and evaluation batch.
        """
        if not self.live_configured():
            raise ValueError("a live frame before the run's settings came from the aggregator")
        assert self.train_cfg is not None
        self._live_frames += 1
        key = (LIVE_NOISE_STREAM, self._live_frames, self.secret)
        act = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32))
        with torch.no_grad():
            wire = to_wire(nn.Identity(), act, self.defence, self.train_cfg.compression, key)
        return wire.tensors

    def live_features_spec(self) -> ShapeSpec:
        """U-shape: what the aggregator answers a PREDICT with (the features, not logits)."""
        if not self.ushaped:
            raise ValueError("features for a live frame outside a U-shaped run")
        assert self.model_cfg is not None
        return {"features": (frozenset({"F32"}), (-1, feature_dim(self.model_cfg)))}

    def activation_spec(self) -> dict:  # type: ignore[type-arg]
        assert self.train_cfg is not None
        return activation_spec(self.train_cfg.compression, self.smashed_shape())
