"""PyVertical: private set intersection, then a multi-head SplitNN on vertically split crops.

Who holds what:

* Each data owner (a device, `OwnerRuntime`) holds one part of the eye region (a rectangle of
  every crop it has) under record ids, and one *head*: the first `cut` conv blocks, applied to
  its part. The head and its optimizer never leave the owner.
* The label holder (the aggregator, `PyVertical`) holds the labels under record ids and the
  *trunk*: the rest of the network. It never sees a pixel or a head weight.

Protocol (only existing message types; PSI protobufs travel as uint8 tensors):

1. PSI. The label holder encrypts its ids once (ECDH, its own key) and sends the query to every
   owner: ROUND_START{phase: psi} + `psi_request`. Each owner answers with its own ids encrypted
   under its key and the query re-encrypted: CLIENT_UPDATE{phase: psi} + `psi_setup`,
   `psi_response`. The label holder learns which of *its* ids each owner holds; an owner learns
   only how many ids the query had.
2. Alignment. The label holder intersects the answers and sends each owner the common ids (all
   of which that owner holds), training and test records apart, in one canonical order:
   ROUND_START{phase: align} + `train_ids`, `test_ids`. Owners acknowledge with CLIENT_UPDATE.
3. Training, in lock step. ROUND_START{phase: train} -> every owner sends SMASHED (its head's
   feature map for batch s of the shared seeded batch plan, no labels); when all owners' maps
   for step s are in, the trunk stitches them into the crop's layout, steps, and sends each
   owner GRADIENTS for its part; the owner steps its head and sends batch s+1, or CLIENT_UPDATE
   at the end.
4. Evaluation. EVAL_REQUEST -> owners send EVAL_SMASHED for their aligned held-out parts; the
   label holder predicts and counts against its labels.

"clients" of this algorithm are the data owners (vertical parts).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.algorithms.base import Algorithm, RoundTrain
from splitfed.config import TrainConfig, round_lr
from splitfed.data.batches import to_tensor
from splitfed.data.dataset import EmotionDataset
from splitfed.data.vertical import (
    LabelTable,
    OwnerTable,
    VerticalConfig,
    VerticalData,
    batch_flips,
    batch_plan,
    part_batches,
    vertical_partition,
)
from splitfed.device import DeviceRuntime
from splitfed.emotions import NUM_CLASSES
from splitfed.errors import UserError
from splitfed.model import (
    ClientNet,
    ModelConfig,
    ServerNet,
    build_split_model,
    seeded,
    smashed_shape,
)
from splitfed.psi import PsiQuerier, PsiResponder, decode_ids, encode_ids, from_wire, to_wire
from splitfed.runner import RunOptions, run, write_outputs
from splitfed.server import ClientInfo, ServerIO
from splitfed.training import confusion, make_optimizer, set_lr
from splitfed.transport import InProcessTransport, Transport
from splitfed.wire import (
    MAX_MESSAGE_BYTES,
    Envelope,
    JoinBody,
    Message,
    MsgType,
    Sequencer,
    ShapeSpec,
    Validator,
    activation_spec,
    encode,
    pack_activations,
    pack_gradients,
    unpack_activations,
)

log = logging.getLogger(__name__)

EVAL_BATCH = 256
MAX_OWNERS = 32
U8 = frozenset({"U8"})


# ---- the model ----------------------------------------------------------------------------------


def head_scale(split: ModelConfig) -> int:
    """How much the device half of `split` shrinks its input (stem stride times its pools)."""
    c, h, w = split.input_shape
    _, sh, sw = smashed_shape(split)
    if h % sh or w % sw or h // sh != w // sw:
        raise ValueError(f"the device half maps {h}x{w} to {sh}x{sw}: not a whole, even scale")
    return h // sh


class VerticalModelConfig(BaseModel):
    """The multi-head network: one head per owner's part, a trunk on the stitched feature maps.

    `split` is the ordinary split CNN; each head is a copy of its device half applied to one
    part, and the trunk is its server half applied to the heads' maps put back in place. Part
    edges are multiples of the device half's scale, so every map lands on whole cells.
    """

    model_config = ConfigDict(extra="forbid")

    split: ModelConfig = Field(description="the split CNN whose halves make the heads and trunk")
    boxes: list[tuple[int, int, int, int]] = Field(description="each owner's part: y0, y1, x0, x1")
    mirror: bool = Field(
        False,
        description="also mirror records in training (needs a symmetric layout); over 10 rounds "
        "on the synthetic set it slowed learning more than it helped",
    )

    def model_post_init(self, _context: object) -> None:
        if not self.boxes:
            raise ValueError("need at least one part")
        _, h, w = self.input_shape
        s = self.scale
        taken = np.zeros((h, w), dtype=bool)
        for y0, y1, x0, x1 in self.boxes:
            if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
                raise ValueError(f"part {(y0, y1, x0, x1)} is outside the {h}x{w} crop")
            if any(v % s for v in (y0, y1, x0, x1)):
                raise ValueError(f"part {(y0, y1, x0, x1)} edges must be multiples of {s}")
            if taken[y0:y1, x0:x1].any():
                raise ValueError(f"part {(y0, y1, x0, x1)} overlaps another part")
            taken[y0:y1, x0:x1] = True

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.split.input_shape

    @property
    def scale(self) -> int:
        return head_scale(self.split)

    def grid(self) -> tuple[int, int, int]:
        """Shape of the stitched map: the device half's output for the whole crop."""
        return smashed_shape(self.split)

    def head_shape(self, k: int) -> tuple[int, int, int]:
        y0, y1, x0, x1 = self.boxes[k]
        return self.grid()[0], (y1 - y0) // self.scale, (x1 - x0) // self.scale

    def part_shape(self, k: int) -> tuple[int, int, int]:
        y0, y1, x0, x1 = self.boxes[k]
        return self.input_shape[0], y1 - y0, x1 - x0

    def mirror_map(self) -> list[int] | None:
        """Which part lies where each part's mirror image does; None if the layout is not
        symmetric left to right (then training augments without mirroring)."""
        w = self.input_shape[2]
        where = {tuple(b): k for k, b in enumerate(self.boxes)}
        out = [where.get((y0, y1, w - x1, w - x0)) for y0, y1, x0, x1 in self.boxes]
        return None if any(k is None for k in out) else out  # type: ignore[misc]

    def mirrors(self) -> bool:
        return self.mirror and self.mirror_map() is not None


class Trunk(nn.Module):
    """The label holder's half: puts the heads' maps where their parts were, then the CNN's rest."""

    def __init__(self, server: ServerNet, cfg: VerticalModelConfig) -> None:
        super().__init__()
        self.server = server
        self.boxes = [tuple(v // cfg.scale for v in b) for b in cfg.boxes]
        self.grid = cfg.grid()
        self.mirror = cfg.mirror_map()

    def _place(self, parts: list[torch.Tensor], boxes: list[tuple[int, ...]]) -> torch.Tensor:
        out = parts[0].new_zeros((parts[0].shape[0], *self.grid))
        for (y0, y1, x0, x1), p in zip(boxes, parts, strict=True):
            out[:, :, y0:y1, x0:x1] = p
        return out

    def stitch(self, parts: list[torch.Tensor], flip: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' maps in the crop's layout; a mirrored record's maps go to mirrored places."""
        if len(parts) != len(self.boxes):
            raise ValueError(f"{len(parts)} parts for {len(self.boxes)} heads")
        out = self._place(parts, self.boxes)
        if flip is not None and bool(flip.any()):
            if self.mirror is None:
                raise ValueError("mirrored records, but the parts are not laid out symmetrically")
            mirrored = self._place(parts, [self.boxes[m] for m in self.mirror])
            out = torch.where(flip[:, None, None, None], mirrored, out)
        return out

    def forward(self, parts: list[torch.Tensor], flip: torch.Tensor | None = None) -> torch.Tensor:
        return self.server(self.stitch(parts, flip))


def build_vertical_model(cfg: VerticalModelConfig, seed: int) -> tuple[list[ClientNet], Trunk]:
    """Heads and trunk from the seeded split CNN: every head starts as its device half."""
    client, server = build_split_model(cfg.split, seed)
    return [copy.deepcopy(client) for _ in cfg.boxes], Trunk(server, cfg)


# ---- the aggregator's messaging with an algorithm's own specs -----------------------------------


class AlgorithmIO(ServerIO):
    """`ServerIO` for algorithms whose clients hold other data than whole crops.

    The same checked, counted messaging, with the algorithm's own tensor specs; JOINs of any
    input shape are admitted and their bodies kept, for the algorithm to check its layout.
    """

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        train_cfg: TrainConfig,
        specs: dict[MsgType, Any],
        max_batch: int = 1024,
    ) -> None:
        super().__init__(transport, run_id, ModelConfig(), train_cfg, max_batch)
        self.join_info: dict[str, dict[str, Any]] = {}
        self.validator = Validator(
            run_id,
            {MsgType.JOIN: {}, MsgType.LEAVE: {}, **specs},
            known_sender=self._known,
            round_ok=self._round_ok,
            max_batch=max_batch,
        )

    def _register(self, body: JoinBody) -> None:
        if body.client_id in self.clients:
            log.debug("client %s re-joined", body.client_id)
        else:
            log.debug("client %s joined with %d records", body.client_id, body.n_train)
        self.clients[body.client_id] = ClientInfo(
            body.client_id, body.n_train, body.n_test, body.class_counts
        )

    def _accept(self, ev: Any) -> Any:
        out = super()._accept(ev)
        if isinstance(out, Message) and out.type is MsgType.JOIN and out.src in self.clients:
            self.join_info[out.src] = dict(out.env.body)
        return out


def byte_spec(env: Envelope, *names: str) -> ShapeSpec:
    """uint8 tensors whose lengths the body declares as `<name>_bytes`."""
    out: ShapeSpec = {}
    for n in names:
        size = env.body[f"{n}_bytes"]
        if not isinstance(size, int) or not 0 <= size <= MAX_MESSAGE_BYTES:
            raise ValueError(f"bad length of {n}")
        out[n] = (U8, (size,))
    return out


# ---- the data owner (device side) ---------------------------------------------------------------


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

    def _round_ok(self, env: Envelope) -> bool:
        if env.round < self._max_round:
            return False
        self._max_round = env.round
        return True

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
        key = (body.seed, msg.env.round, 0)
        steps = len(batch_plan(len(images), cfg.batch_size, key, cfg.local_epochs))
        mirror = self.cfg is not None and self.cfg.mirrors()
        batches = part_batches(images, cfg.batch_size, key, cfg.local_epochs, cfg.augment, mirror)
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


# ---- the label holder (aggregator side) ---------------------------------------------------------


@dataclass
class Alignment:
    """The label holder's view after PSI."""

    train_ids: list[str]
    test_ids: list[str]
    y_train: np.ndarray
    y_test: np.ndarray
    per_owner: dict[str, int]  # how many of the label holder's ids each owner holds
    psi_bytes: int = 0
    psi_seconds: float = 0.0


class PyVertical(Algorithm):
    """The label holder: runs PSI, holds labels and trunk, drives the owners in lock step."""

    name = "pyvertical"
    mode = "local"  # nothing to publish: heads stay with their owners

    def __init__(
        self, model_cfg: VerticalModelConfig, train_cfg: TrainConfig, seed: int, labels: LabelTable
    ) -> None:
        super().__init__(model_cfg.split, train_cfg, seed)
        # The model is the multi-head network: the trunk here, the heads with their owners.
        self.model_cfg = model_cfg  # type: ignore[assignment]
        _, self.trunk = build_vertical_model(model_cfg, seed)
        self.server_net = self.trunk  # type: ignore[assignment]
        self.client_net = nn.ModuleDict()  # type: ignore[assignment]
        self.server_opt = make_optimizer(self.trunk.parameters(), train_cfg)
        self.labels = labels
        self.aligned: Alignment | None = None

    # ---- membership ---------------------------------------------------------------------------

    def owners(self) -> list[str]:
        return sorted(self.indices, key=self.indices.__getitem__)

    def _check_owners(self, io: ServerIO, participants: list[str]) -> None:
        owners = self.owners()
        if len(owners) != len(self.model_cfg.boxes):
            raise UserError(
                f"{len(owners)} data owners joined, the model has {len(self.model_cfg.boxes)} parts"
            )
        missing = [c for c in owners if c not in participants]
        if missing:
            raise RuntimeError(f"data owner(s) {', '.join(missing)} offline: every part is needed")
        for cid in owners:
            box = tuple(getattr(io, "join_info", {}).get(cid, {}).get("box", ()))
            want = tuple(self.model_cfg.boxes[self.indices[cid]])
            if box != want:
                raise UserError(
                    f"data owner {cid} holds part {box or '?'}, the model expects {want}"
                )

    def specs(self) -> dict[MsgType, Any]:
        """What the label holder accepts from owners (for `AlgorithmIO`)."""

        def act(env: Envelope) -> ShapeSpec:
            return activation_spec(
                self.train_cfg.compression, self.model_cfg.head_shape(self.indices[env.src])
            )

        def update(env: Envelope) -> ShapeSpec:
            if env.body.get("phase") == "psi":
                return byte_spec(env, "psi_setup", "psi_response")
            return {}

        return {MsgType.SMASHED: act, MsgType.EVAL_SMASHED: act, MsgType.CLIENT_UPDATE: update}

    def body(self, cid: str, phase: str, **extra: Any) -> dict[str, Any]:
        return {
            "algo": self.name,
            "phase": phase,
            "seed": self.seed,
            "owner_index": self.indices[cid],
            "model": self.model_cfg.model_dump(mode="json"),
            "train": self.train_cfg.model_dump(mode="json"),
            **extra,
        }

    # ---- PSI and alignment --------------------------------------------------------------------

    def align(self, io: ServerIO, timeout: float) -> Alignment:
        t0 = time.perf_counter()
        up0, down0 = io.transport.bytes_up, io.transport.bytes_down
        owners = self.owners()
        querier = PsiQuerier(self.labels.ids.tolist())
        request = querier.request()
        held: dict[str, list[str]] = {}
        for cid in owners:
            io.send(
                cid,
                MsgType.ROUND_START,
                {"algo": self.name, "phase": "psi", "psi_request_bytes": len(request)},
                {"psi_request": to_wire(request)},
            )

        def on_psi(msg: Message) -> None:
            if msg.type is MsgType.CLIENT_UPDATE and msg.env.body.get("phase") == "psi":
                held[msg.src] = querier.intersection(
                    from_wire(msg.tensors["psi_setup"]), from_wire(msg.tensors["psi_response"])
                )
                active.discard(msg.src)

        active = set(owners)
        dropped = self.collect(
            io, active, time.monotonic() + timeout, on_psi, "private set intersection"
        )
        if dropped:
            raise RuntimeError(f"data owner(s) {', '.join(dropped)} did not answer the PSI query")
        common = set(querier.ids)
        for cid in owners:
            if not held[cid]:
                raise UserError(
                    f"data owner {cid} shares no record id with the label holder: "
                    "no overlap (are the partitions of different people?)"
                )
            common &= set(held[cid])
        if not common:
            raise UserError(
                "no record id is held by every data owner and the label holder: no overlap "
                "(are the partitions of different people?)"
            )
        test = dict(zip(self.labels.ids.tolist(), self.labels.test.tolist(), strict=True))
        label = dict(zip(self.labels.ids.tolist(), self.labels.labels.tolist(), strict=True))
        train_ids = sorted(i for i in common if not test[i])
        test_ids = sorted(i for i in common if test[i])
        if len(train_ids) < 2:
            raise UserError(
                f"only {len(train_ids)} common training record(s) after PSI: too little overlap"
            )
        tensors = {"train_ids": encode_ids(train_ids), "test_ids": encode_ids(test_ids)}
        sizes = {f"{k}_bytes": int(v.size) for k, v in tensors.items()}
        for cid in owners:
            io.send(
                cid, MsgType.ROUND_START, {"algo": self.name, "phase": "align", **sizes}, tensors
            )

        def on_align(msg: Message) -> None:
            if msg.type is MsgType.CLIENT_UPDATE and msg.env.body.get("phase") == "align":
                n = int(msg.env.body["n_samples"])
                if n != len(train_ids):
                    raise ValueError(f"{msg.src} aligned {n} records, not {len(train_ids)}")
                active.discard(msg.src)

        active = set(owners)
        dropped = self.collect(io, active, time.monotonic() + timeout, on_align, "alignment")
        if dropped:
            raise RuntimeError(f"data owner(s) {', '.join(dropped)} did not align their records")
        log.info(
            "PSI: %d common records (%d train, %d test) of the label holder's %d",
            len(common),
            len(train_ids),
            len(test_ids),
            len(querier.ids),
        )
        return Alignment(
            train_ids,
            test_ids,
            np.asarray([label[i] for i in train_ids], dtype=np.int64),
            np.asarray([label[i] for i in test_ids], dtype=np.int64),
            {cid: len(held[cid]) for cid in owners},
            psi_bytes=(io.transport.bytes_up - up0) + (io.transport.bytes_down - down0),
            psi_seconds=time.perf_counter() - t0,
        )

    # ---- training -----------------------------------------------------------------------------

    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        self._check_owners(io, participants)
        if self.aligned is None:
            self.aligned = self.align(io, timeout)
        al = self.aligned
        cfg = self.train_cfg
        owners = self.owners()
        key = (self.seed, rnd, 0)
        plan = batch_plan(len(al.train_ids), cfg.batch_size, key, cfg.local_epochs)
        mirror = self.model_cfg.mirrors()
        flips = batch_flips(
            len(al.train_ids), cfg.batch_size, key, cfg.local_epochs, cfg.augment, mirror
        )
        result = RoundTrain()
        waiting: dict[int, dict[str, Message]] = {}
        for cid in owners:
            body = self.body(cid, "train", weights_version=self.version, lr=self.lr)
            io.send(cid, MsgType.ROUND_START, body)

        def step(s: int, msgs: dict[str, Message]) -> None:
            idx = plan[s][1]
            parts = [
                torch.from_numpy(unpack_activations(msgs[c].tensors)).requires_grad_(True)
                for c in owners
            ]
            if any(p.shape[0] != len(idx) for p in parts):
                raise ValueError(
                    f"step {s}: batch sizes {[p.shape[0] for p in parts]}, expected {len(idx)}"
                )
            y = torch.from_numpy(al.y_train[idx])
            self.trunk.train()
            with seeded(self.seed, rnd, 0, s, 1):
                out = self.trunk(parts, flips[s])
            loss = self.loss_fn(out, y)
            self.server_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.server_opt.step()
            result.add(loss.item(), int((out.argmax(1) == y).sum()), len(y))
            for c, p in zip(owners, parts, strict=True):
                assert p.grad is not None
                io.send(
                    c,
                    MsgType.GRADIENTS,
                    {"step": s, "loss": loss.item()},
                    pack_gradients(p.grad.numpy(), cfg.grad_compression),
                    reply_to=msgs[c].env.message_id,
                )

        def on_message(msg: Message) -> None:
            if msg.type is MsgType.SMASHED:
                s = int(msg.env.body["step"])
                if not 0 <= s < len(plan):
                    raise ValueError(f"step {s} outside the round's {len(plan)} steps")
                waiting.setdefault(s, {})[msg.src] = msg
                if len(waiting[s]) == len(owners):
                    step(s, waiting.pop(s))
            elif msg.type is MsgType.CLIENT_UPDATE and msg.env.body.get("phase") == "train":
                if int(msg.env.body["steps"]) != len(plan):
                    raise ValueError(
                        f"{msg.src} ran {msg.env.body['steps']} steps, not {len(plan)}"
                    )
                result.completed.append(msg.src)
                active.discard(msg.src)

        active = set(owners)
        result.dropped = self.collect(
            io, active, time.monotonic() + timeout, on_message, f"round {rnd}"
        )
        if result.dropped:
            log.error(
                "round %d: owner(s) %s dropped out; the heads are out of step", rnd, result.dropped
            )
        self.version += 1
        return result

    # ---- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self, io: ServerIO, participants: list[str], split: str, timeout: float
    ) -> np.ndarray:
        conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        if self.aligned is None:
            self.aligned = self.align(io, timeout)
        y_all = self.aligned.y_train if split == "train" else self.aligned.y_test
        if len(y_all) == 0:
            return conf
        owners = self.owners()
        steps = -(-len(y_all) // EVAL_BATCH)
        waiting: dict[int, dict[str, Message]] = {}
        counts = dict.fromkeys(owners, 0)
        for cid in owners:
            io.send(cid, MsgType.EVAL_REQUEST, self.body(cid, "eval", split=split))

        def on_message(msg: Message) -> None:
            nonlocal conf
            if msg.type is not MsgType.EVAL_SMASHED or msg.env.body["split"] != split:
                return
            s = int(msg.env.body["step"])
            if int(msg.env.body["steps"]) != steps or not 0 <= s < steps:
                raise ValueError(
                    f"eval step {s} of {msg.env.body['steps']}, expected {steps} steps"
                )
            waiting.setdefault(s, {})[msg.src] = msg
            counts[msg.src] += 1
            if counts[msg.src] == steps:
                active.discard(msg.src)
            if len(waiting[s]) == len(owners):
                msgs = waiting.pop(s)
                y = y_all[s * EVAL_BATCH : (s + 1) * EVAL_BATCH]
                parts = [torch.from_numpy(unpack_activations(msgs[c].tensors)) for c in owners]
                if any(p.shape[0] != len(y) for p in parts):
                    raise ValueError(f"eval step {s}: batch sizes do not match the labels")
                self.trunk.eval()
                with torch.no_grad():
                    pred = self.trunk(parts).argmax(1).numpy()
                conf += confusion(y, pred)

        active = set(owners)
        self.collect(io, active, time.monotonic() + timeout, on_message, f"evaluation ({split})")
        return conf

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.aligned = None  # owners that restarted have to align again


# ---- the same network trained in one place (the oracle of the equivalence test) -----------------


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
        mirror = self.cfg.mirrors()
        iters = [
            part_batches(p, cfg.batch_size, key, cfg.local_epochs, cfg.augment, mirror)
            for p in parts
        ]
        loss_sum, correct, seen = 0.0, 0, 0
        for s, (_, idx) in enumerate(plan):
            acts = []
            for k, (head, it) in enumerate(zip(self.heads, iters, strict=True)):
                head.train()
                x, flip = next(it)
                with seeded(self.seed, rnd, k, s, 0):
                    acts.append(head(x))
            self.trunk.train()
            with seeded(self.seed, rnd, 0, s, 1):
                out = self.trunk(acts, flip)
            y = torch.from_numpy(labels[idx])
            loss = self.loss_fn(out, y)
            for opt in (*self.head_opts, self.trunk_opt):
                opt.zero_grad(set_to_none=True)
            loss.backward()
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


# ---- simulation ---------------------------------------------------------------------------------


def owner_id(i: int) -> str:
    return f"owner-{i:02d}"


def model_config_for(data: VerticalData, base: ModelConfig | None) -> VerticalModelConfig:
    base = base or ModelConfig(input_shape=data.input_shape)
    if tuple(base.input_shape) != data.input_shape:
        base = base.model_copy(update={"input_shape": data.input_shape})
    return VerticalModelConfig(split=base, boxes=data.boxes)


def build_federation(
    data: VerticalData,
    model_cfg: VerticalModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    run_id: str = "sim",
) -> tuple[PyVertical, AlgorithmIO, list[OwnerRuntime]]:
    """Owners, transport and label holder for one in-process run."""
    runtimes = [OwnerRuntime(owner_id(i), run_id, t) for i, t in enumerate(data.owners)]
    algo = PyVertical(model_cfg, train_cfg, seed, data.labels)
    io = AlgorithmIO(InProcessTransport(runtimes), run_id, train_cfg, algo.specs())  # type: ignore[arg-type]
    return algo, io, runtimes


def simulate_pyvertical(data: EmotionDataset, spec: Any, on_round: Any = None) -> dict[str, Any]:
    """`aggregator simulate --algo pyvertical`: spec.clients data owners, one part each."""
    base = spec.model or ModelConfig(input_shape=data.input_shape)
    if tuple(base.input_shape) != data.input_shape:
        base = base.model_copy(update={"input_shape": data.input_shape})
    if spec.partition not in (None, "vertical"):
        log.info("pyvertical partitions vertically; --partition %s is not used", spec.partition)
    if not 1 <= spec.clients <= MAX_OWNERS:
        raise UserError(
            f"pyvertical takes 1 to {MAX_OWNERS} data owners (--clients), got {spec.clients}"
        )
    try:
        scale = head_scale(base)
    except ValueError as e:
        raise UserError(f"pyvertical cannot cut these crops into parts: {e}") from None
    vcfg = VerticalConfig(owners=spec.clients, align=scale, seed=spec.seed)
    vdata = vertical_partition(data, vcfg, spec.split, spec.seed)
    model_cfg = model_config_for(vdata, base)
    train_cfg = spec.train or TrainConfig()
    algo, io, _ = build_federation(vdata, model_cfg, train_cfg, spec.seed, spec.run_id)
    data_info: dict[str, Any] = {
        "name": data.name,
        "n_train": 0,
        "n_test": 0,
        "split": vdata.split,
        "partition": f"vertical:{spec.clients}",
        "synthetic": bool(data.meta.get("synthetic", False)),
        "clients_samples": [len(o) for o in vdata.owners],
    }
    opts = RunOptions(
        rounds=spec.rounds,
        min_clients=spec.clients,
        checkpoint_dir=spec.out_dir / "checkpoint" if spec.out_dir else None,
        resume=False,
        data_info=data_info,
        on_round=on_round,
    )
    metrics = run(algo, io, opts)
    al = algo.aligned
    assert al is not None
    metrics["data"].update(n_train=len(al.train_ids), n_test=len(al.test_ids))
    metrics["clients"] = spec.clients
    metrics["psi"] = {
        "label_records": len(vdata.labels.ids),
        "owner_records": [len(o) for o in vdata.owners],
        "held_by_each_owner": [al.per_owner[c] for c in algo.owners()],
        "intersection": len(al.train_ids) + len(al.test_ids),
        "bytes": al.psi_bytes,
        "seconds": al.psi_seconds,
        "boxes": [list(b) for b in vdata.boxes],
    }
    if spec.out_dir is not None:
        write_outputs(metrics, spec.out_dir)
    return metrics


def _register() -> None:
    from splitfed.simulate import EXTRA_SIMULATORS

    EXTRA_SIMULATORS["pyvertical"] = simulate_pyvertical


_register()

__all__ = [
    "AlgorithmIO",
    "CentralVertical",
    "OwnerRuntime",
    "PyVertical",
    "Trunk",
    "VerticalModelConfig",
    "build_federation",
    "build_vertical_model",
    "simulate_pyvertical",
]
