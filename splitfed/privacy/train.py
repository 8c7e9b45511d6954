"""Training under a defence, so the report can give each setting its test accuracy.

`DefendedClientRuntime` is the product's `ClientRuntime` with its three wire points (training
batches, their gradients, evaluation batches) routed through `splitfed.defences`. Until the
runtime itself calls `to_wire` and `nopeek_backward`, this subclass is how the simulator trains
a defended run; `train_setting` is `simulate` with it as the runtime factory.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitfed.checkpoint import load_model
from splitfed.client import ClientRuntime, _Eval
from splitfed.config import TrainConfig
from splitfed.data.batches import iterate_batches
from splitfed.data.dataset import EmotionDataset
from splitfed.defences import DefenceConfig, WireBatch, nopeek_backward, to_wire
from splitfed.errors import UserError
from splitfed.metrics import write_json
from splitfed.model import ClientNet, ModelConfig, seeded
from splitfed.simulate import SimSpec, simulate
from splitfed.wire import Message, MsgType

SPLIT_ALGORITHMS = ("sl", "sflv1", "sflv2")
EVAL_BATCH = 256


class DefendedClientRuntime(ClientRuntime):
    """A client runtime whose smashed data leave through `to_wire` under one defence.

    `secret` stands for a device-local secret mixed into the noise seed: the aggregator picks
    the run seed, so noise drawn from the run seed alone it could regenerate and subtract.
    """

    def __init__(self, *args: Any, defence: DefenceConfig, secret: int = 0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.defence = defence
        self.secret = secret
        self._pending_x: torch.Tensor | None = None
        self._pending_batch: WireBatch | None = None

    def _compression(self) -> Any:
        assert self.train_cfg is not None
        return self.defence.wire_compression(self.train_cfg.compression)

    def _next_smashed(self, reply_to: str) -> Message:
        r = self.round
        assert r is not None and self.client_net is not None
        try:
            x, y = next(r.batches)
        except StopIteration:
            return self._update_message(reply_to, {})
        self.client_net.train()
        with seeded(r.seed, r.round, r.index, r.step, 0):
            batch = to_wire(
                self.client_net,
                x,
                self.defence,
                self._compression(),
                (r.seed, r.round, r.index, r.step, self.secret),
            )
        r.pending = (r.step, batch.activations)
        self._pending_x, self._pending_batch = x, batch
        r.samples += len(y)
        tensors = dict(batch.tensors)
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
        assert self._pending_x is not None and self._pending_batch is not None
        self.opt.zero_grad(set_to_none=True)
        nopeek_backward(self._pending_x, self._pending_batch, grad, self.defence)
        self.opt.step()
        r.pending, self._pending_x, self._pending_batch = None, None, None
        r.step += 1
        return [self._next_smashed(msg.env.message_id)]

    def _on_eval_request(self, msg: Message) -> list[Message]:
        body = msg.env.body
        split = str(body["split"])
        ds = self._eval_data(split)
        if body.get("mode") == "local" or ds is None or len(ds) == 0:
            return super()._on_eval_request(msg)
        self._configure(body)
        self._load(msg)
        assert self.client_net is not None
        self.client_net.eval()
        batches = list(iterate_batches(ds, EVAL_BATCH, (0,), train=False))
        ev = _Eval(
            msg.env.round, split, expected=len(batches), conf=np.zeros((7, 7), dtype=np.int64)
        )
        self.evals[split] = ev
        out: list[Message] = []
        with torch.no_grad():
            for step, (x, y) in enumerate(batches):
                ev.labels[step] = y.numpy()
                key = (int(body.get("seed", 0)), msg.env.round, 1_000_000 + step, self.secret)
                batch = to_wire(self.client_net, x, self.defence, self._compression(), key)
                b = {"split": split, "step": step, "steps": len(batches)}
                out.append(
                    self.seq.make(
                        MsgType.EVAL_SMASHED,
                        msg.env.round,
                        b,
                        batch.tensors,
                        reply_to=msg.env.message_id,
                    )
                )
        return out


@dataclass
class RunSetup:
    """How a run was trained: enough to train it again with a defence on the same split."""

    algo: str = "sflv1"
    clients: int = 2
    rounds: int = 15
    seed: int = 0
    partition: str | None = None
    model: ModelConfig | None = None
    train: TrainConfig | None = None


def defended_runtime(defence: DefenceConfig) -> Callable[..., ClientRuntime]:
    """A `SimSpec.runtime_factory` whose devices send through `defence`."""

    def make(client: str, run_id: str, *args: Any, **kw: Any) -> ClientRuntime:
        secret = zlib.crc32(f"{run_id}/{client}".encode())  # a stand-in for a device secret
        return DefendedClientRuntime(client, run_id, *args, defence=defence, secret=secret, **kw)

    return make


def train_setting(
    data: EmotionDataset, setup: RunSetup, defence: DefenceConfig, out_dir: Path
) -> tuple[dict[str, Any], ClientNet]:
    """Train `setup` with `defence` by the simulator, subject split; (metrics, client half).

    The run's metrics, plots and checkpoint are left in `out_dir`, and the client half is read
    back from that checkpoint, so the report attacks what a deployment would have saved.
    """
    if setup.algo not in SPLIT_ALGORITHMS:
        raise UserError(
            f"privacy-report measures smashed data, which only {', '.join(SPLIT_ALGORITHMS)} "
            f"send; got a {setup.algo} run"
        )
    base = setup.model or ModelConfig(input_shape=data.input_shape)
    model_cfg = defence.model(base.model_copy(update={"input_shape": data.input_shape}))
    train_cfg = setup.train or TrainConfig()
    # The aggregator validates activations against the run's compression: make it the wire's.
    train_cfg = train_cfg.model_copy(
        update={"compression": defence.wire_compression(train_cfg.compression)}
    )
    spec = SimSpec(
        setup.algo,
        setup.clients,
        setup.rounds,
        setup.seed,
        setup.partition,
        "subject",
        model_cfg,
        train_cfg,
        out_dir,
        runtime_factory=defended_runtime(defence),
    )
    metrics = simulate(data, spec)
    metrics["defence"] = defence.model_dump(mode="json")
    write_json(out_dir / "metrics.json", metrics)
    _, client_net, _ = load_model(out_dir / "checkpoint")
    return metrics, client_net
