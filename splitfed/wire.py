"""The wire protocol: one module that the edge agent and the aggregator both import.

A message is a safetensors file: its tensors are the payload and its `__metadata__` holds the
envelope as JSON (modelled on Flower's Message metadata). Nothing executable crosses the wire:
no pickle, no `torch.load`; the header is parsed and checked before any tensor is read.
"""

from __future__ import annotations

import json
import math
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

Compression = Literal["fp32", "fp16", "int8"]
GradCompression = Literal["fp32", "fp16"]


class MsgType(str, Enum):
    JOIN = "join"  # agent -> aggregator: sample counts per class, no images
    ROUND_START = "round_start"  # aggregator -> agent: round config (+ client weights)
    SMASHED = "smashed"  # agent -> aggregator: activations + labels of one batch
    GRADIENTS = "gradients"  # aggregator -> agent: activation gradients + loss
    CLIENT_UPDATE = "client_update"  # agent -> aggregator: weights after the round
    GLOBAL_WEIGHTS = "global_weights"  # aggregator -> all: current global client half (retained)
    EVAL_REQUEST = "eval_request"  # aggregator -> agent: evaluate these weights
    EVAL_SMASHED = "eval_smashed"  # agent -> aggregator: activations of held-out data, no labels
    EVAL_PREDICTIONS = "eval_predictions"  # aggregator -> agent: predicted classes
    EVAL_RESULT = "eval_result"  # agent -> aggregator: counts only
    PREDICT = "predict"  # agent -> aggregator: activations of a live frame
    PREDICTION = "prediction"  # aggregator -> agent: the emotion for that frame
    LEAVE = "leave"  # agent -> aggregator: clean shutdown


class Envelope(BaseModel):
    """Message metadata; snake_case, versioned, validated on every receive."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, description="wire schema version")
    run_id: str = Field(pattern=ID_PATTERN, description="training run this message belongs to")
    round: int = Field(ge=0, le=1_000_000, description="federated round")
    seq: int = Field(ge=0, description="sender's sequence number, strictly new per (run, src)")
    message_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="uuid4 hex")
    src: str = Field(pattern=ID_PATTERN, description="sender id")
    reply_to: str = Field("", pattern=r"^([0-9a-f]{32})?$", description="message answered, if any")
    type: MsgType = Field(description="message type")
    created_at: float = Field(ge=0, description="unix time of creation")
    ttl: float = Field(0.0, ge=0, description="seconds the message stays useful; 0 = no expiry")
    body: dict[str, Any] = Field(default_factory=dict, description="small JSON payload")


@dataclass
class Message:
    env: Envelope
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def type(self) -> MsgType:
        return self.env.type

    @property
    def src(self) -> str:
        return self.env.src


class WireError(ValueError):
    """A received message failed validation; the text is the logged reason."""


class Sequencer:
    """Builds envelopes for one sender with increasing sequence numbers."""

    def __init__(self, src: str, run_id: str) -> None:
        self.src = src
        self.run_id = run_id
        self.seq = 0

    def make(
        self,
        type: MsgType,
        round: int,
        body: Mapping[str, Any] | None = None,
        tensors: Mapping[str, np.ndarray] | None = None,
        reply_to: str = "",
        ttl: float = 0.0,
    ) -> Message:
        self.seq += 1
        env = Envelope(
            run_id=self.run_id,
            round=round,
            seq=self.seq,
            message_id=uuid.uuid4().hex,
            src=self.src,
            reply_to=reply_to,
            type=type,
            created_at=time.time(),
            ttl=ttl,
            body=dict(body or {}),
        )
        return Message(env, dict(tensors or {}))


def encode(msg: Message) -> bytes:
    """Serialise to safetensors bytes with the envelope in the metadata."""
    tensors = {k: np.ascontiguousarray(v) for k, v in msg.tensors.items()}
    return st_save(tensors, metadata={"envelope": msg.env.model_dump_json()})


_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_header(data: bytes) -> tuple[Envelope, dict[str, tuple[str, tuple[int, ...]]]]:
    """Parse and check the safetensors header without touching tensor data."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
    if len(data) < 8:
        raise WireError("message shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise WireError(f"bad header length {n}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("header is not an object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or "envelope" not in meta:
        raise WireError("no envelope in metadata")
    try:
        env = Envelope.model_validate_json(meta["envelope"])
    except ValidationError as e:
        first = e.errors()[0]
        raise WireError(
            f"bad envelope: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from None
    if env.schema_version != SCHEMA_VERSION:
        raise WireError(f"schema version {env.schema_version}, expected {SCHEMA_VERSION}")
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
            raise WireError(f"tensor {name!r}: unsupported dtype")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WireError(f"tensor {name!r}: bad shape")
        specs[name] = (info["dtype"], tuple(shape))
    return env, specs


# Expected tensors per message type: name -> (allowed dtypes, shape pattern). A shape pattern
# uses -1 for "any size" (the batch dimension) and is filled in by the receiver's Validator.
ShapeSpec = dict[str, tuple[frozenset[str], tuple[int, ...]]]


def decode(data: bytes) -> Message:
    """Decode without semantic checks (used by the Validator and by tests)."""
    env, _ = read_header(data)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise WireError(f"corrupt tensor data: {e}") from None
    return Message(env, dict(tensors))


class Validator:
    """Checks every received message against what the receiver expects right now.

    Schema, size, dtype, shape, finite values, known sender, current run and round, and a
    sequence number not seen before. `check` raises WireError with the reason.
    """

    def __init__(
        self,
        run_id: str,
        specs: Mapping[MsgType, ShapeSpec | Callable[[Envelope], ShapeSpec]],
        known_sender: Callable[[str], bool] = lambda _: True,
        round_ok: Callable[[Envelope], bool] = lambda _: True,
        max_batch: int = 1024,
    ) -> None:
        self.run_id = run_id
        self.specs = dict(specs)
        self.known_sender = known_sender
        self.round_ok = round_ok
        self.max_batch = max_batch
        self._last_seq: dict[str, int] = {}
        self._seen_ids: set[str] = set()

    def check(self, data: bytes) -> Message:
        env, specs = read_header(data)
        if env.run_id != self.run_id:
            raise WireError(f"run {env.run_id!r} is not the current run {self.run_id!r}")
        if env.type not in self.specs:
            raise WireError(f"unexpected message type {env.type.value!r}")
        if env.type is not MsgType.JOIN and not self.known_sender(env.src):
            raise WireError(f"unknown client {env.src!r}")
        if env.ttl and time.time() > env.created_at + env.ttl:
            raise WireError("message expired (ttl)")
        # A JOIN starts a sender's sequence afresh (an agent that restarted); replays of it are
        # still caught by their message id.
        stale = env.type is not MsgType.JOIN and env.seq <= self._last_seq.get(env.src, 0)
        if stale or env.message_id in self._seen_ids:
            raise WireError(f"replayed or out-of-order seq {env.seq} from {env.src!r}")
        if not self.round_ok(env):
            raise WireError(f"{env.type.value} for round {env.round} is not for the current round")
        spec = self.specs[env.type]
        try:
            expected = spec(env) if callable(spec) else spec
        except (KeyError, TypeError, ValueError, ValidationError) as e:
            raise WireError(f"bad {env.type.value} body: {e}") from None
        if set(specs) != set(expected):
            raise WireError(f"tensors {sorted(specs)} != expected {sorted(expected)}")
        for name, (dtype, shape) in specs.items():
            dtypes, pattern = expected[name]
            if dtype not in dtypes:
                raise WireError(f"tensor {name!r}: dtype {dtype} not in {sorted(dtypes)}")
            if len(shape) != len(pattern) or any(
                p != -1 and p != s for p, s in zip(pattern, shape)
            ):
                raise WireError(f"tensor {name!r}: shape {shape} does not match {pattern}")
            if pattern and pattern[0] == -1 and not 1 <= shape[0] <= self.max_batch:
                raise WireError(f"tensor {name!r}: batch {shape[0]} outside 1..{self.max_batch}")
        msg = decode(data)
        for name, arr in msg.tensors.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise WireError(f"tensor {name!r} has non-finite values")
        batch_sizes = {a.shape[0] for n, a in msg.tensors.items() if expected[n][1][:1] == (-1,)}
        if len(batch_sizes) > 1:
            raise WireError(f"tensors disagree on batch size: {sorted(batch_sizes)}")
        self._last_seq[env.src] = env.seq
        self._seen_ids.add(env.message_id)
        if len(self._seen_ids) > 100_000:
            self._seen_ids.clear()
        return msg

    def forget(self, src: str) -> None:
        """A sender restarted with a fresh sequence (it said so in a JOIN)."""
        self._last_seq.pop(src, None)


# ---- tensor packing --------------------------------------------------------------------------


def pack_activations(x: np.ndarray, compression: Compression) -> dict[str, np.ndarray]:
    """Activations as fp32, fp16, or uint8 with a per-sample, per-channel affine scale."""
    x = np.asarray(x, dtype=np.float32)
    if compression == "fp32":
        return {"activations": x}
    if compression == "fp16":
        return {"activations": x.astype(np.float16)}
    if compression == "int8":
        # uint8 codes with an fp16 minimum and step per sample and channel: 8 bits a value plus
        # 4 bytes per channel. Computed from the fp16-rounded parameters, so that decoding on
        # the other side is exactly what was encoded.
        axes = tuple(range(2, x.ndim))
        lo = np.clip(x.min(axis=axes, keepdims=True), -6e4, 6e4).astype(np.float16)
        hi = np.clip(x.max(axis=axes, keepdims=True), -6e4, 6e4)
        step = np.maximum((hi - lo.astype(np.float32)) / 255.0, 1e-7).astype(np.float16)
        step = np.where(step == 0, np.float16(1e-7), step)
        q = np.rint((x - lo.astype(np.float32)) / step.astype(np.float32))
        return {
            "activations": np.clip(q, 0, 255).astype(np.uint8),
            "act_scale": step.reshape(x.shape[:2]),
            "act_min": lo.reshape(x.shape[:2]),
        }
    raise ValueError(f"unknown compression {compression!r}")


def unpack_activations(t: Mapping[str, np.ndarray]) -> np.ndarray:
    a = t["activations"]
    if a.dtype == np.uint8:
        shape = a.shape[:2] + (1,) * (a.ndim - 2)
        step = t["act_scale"].astype(np.float32).reshape(shape)
        return a.astype(np.float32) * step + t["act_min"].astype(np.float32).reshape(shape)
    return a.astype(np.float32)


def pack_gradients(g: np.ndarray, compression: GradCompression) -> dict[str, np.ndarray]:
    g = np.asarray(g, dtype=np.float32)
    return {"grad": g.astype(np.float16) if compression == "fp16" else g}


def activation_spec(compression: Compression, shape: tuple[int, ...]) -> ShapeSpec:
    if compression == "int8":
        return {
            "activations": (frozenset({"U8"}), (-1, *shape)),
            "act_scale": (frozenset({"F16"}), (-1, shape[0])),
            "act_min": (frozenset({"F16"}), (-1, shape[0])),
        }
    return {"activations": (frozenset({"F16" if compression == "fp16" else "F32"}), (-1, *shape))}


def weights_spec(state: Mapping[str, np.ndarray], prefix: str = "w.") -> ShapeSpec:
    out: ShapeSpec = {}
    for k, v in state.items():
        dt = "I64" if v.dtype == np.int64 else "F32"
        out[prefix + k] = (
            frozenset({dt}),
            tuple(v.shape) or (1,),
        )  # safetensors stores scalars as (1,)
    return out


def is_finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


# ---- message bodies that the aggregator receives ------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JoinBody(_Body):
    client_id: str = Field(pattern=ID_PATTERN)
    n_train: int = Field(ge=0, le=10_000_000)
    n_test: int = Field(ge=0, le=10_000_000)
    class_counts: list[int] = Field(min_length=7, max_length=7)
    input_shape: list[int] = Field(min_length=3, max_length=3)


class SmashedBody(_Body):
    step: int = Field(ge=0, le=10_000_000)


class UpdateBody(_Body):
    n_samples: int = Field(ge=0, le=10_000_000)
    steps: int = Field(ge=0)
    seen: int = Field(ge=0)
    full: bool = False
    loss_sum: float = Field(0.0, ge=0, allow_inf_nan=False)
    correct: int = Field(0, ge=0)


class EvalSmashedBody(_Body):
    split: Literal["train", "test"]
    step: int = Field(ge=0)
    steps: int = Field(ge=1)


class EvalResultBody(_Body):
    split: Literal["train", "test"]
    confusion: list[list[int]] = Field(min_length=7, max_length=7)

    def model_post_init(self, _context: object) -> None:
        if any(len(r) != 7 or any(v < 0 for v in r) for r in self.confusion):
            raise ValueError("confusion must be 7x7 non-negative counts")


class PredictBody(_Body):
    frame: int = Field(ge=0)


class LeaveBody(_Body):
    reason: str = Field("stopped", max_length=200)


BODY_MODELS: dict[MsgType, type[_Body]] = {
    MsgType.JOIN: JoinBody,
    MsgType.SMASHED: SmashedBody,
    MsgType.CLIENT_UPDATE: UpdateBody,
    MsgType.EVAL_SMASHED: EvalSmashedBody,
    MsgType.EVAL_RESULT: EvalResultBody,
    MsgType.PREDICT: PredictBody,
    MsgType.LEAVE: LeaveBody,
}


def check_body(msg: Message) -> _Body:
    """Validate the JSON body of a message the aggregator received."""
    model = BODY_MODELS.get(msg.type)
    if model is None:
        raise WireError(f"no body schema for {msg.type.value}")
    try:
        return model.model_validate(msg.env.body)
    except ValidationError as e:
        first = e.errors()[0]
        raise WireError(
            f"bad {msg.type.value} body: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from None
