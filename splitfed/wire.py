"""The wire protocol: one module that the edge agent and the aggregator both import.

A message is a safetensors file: its tensors are the payload and its `__metadata__` holds the
envelope as JSON (modelled on Flower's Message metadata). Nothing executable crosses the wire:
no pickle, no `torch.load`; the header is parsed and checked before any tensor is read.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_ENVELOPE_BYTES = 256 * 1024  # the envelope is one JSON string inside the header
MAX_JSON_DEPTH = 12  # an honest header nests 3 deep, an envelope 5; json.loads recurses
MAX_JSON_STRING = 4096  # any string inside the envelope (ids, reasons, config values)
MAX_NUMBER_CHARS = 40  # one JSON number literal; longer ones are refused before int()
MAX_JSON_INT = 2**63 - 1  # every integer read from the wire fits an int64
MAX_TENSORS = 1024
MAX_TENSOR_NAME = 256
MAX_NDIM = 8
MAX_ELEMENTS = MAX_MESSAGE_BYTES  # a shape's product; computed with a cap, so never overflows
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# The sender id of the separate fed server (SplitFed's "fed server"): it averages the client
# halves, so that the main server (`aggregator`) never receives one. No device may use it.
FED_SERVER_ID = "fed-server"

Compression = Literal["fp32", "fp16", "int8"]
GradCompression = Literal["fp32", "fp16"]
B = TypeVar("B", bound=BaseModel)  # a message body's model


class MsgType(str, Enum):
    JOIN = "join"  # agent -> aggregator: sample counts per class, no images
    ROUND_START = "round_start"  # aggregator -> agent: round config (+ client weights)
    SMASHED = "smashed"  # agent -> aggregator: activations + labels of one batch
    GRADIENTS = "gradients"  # aggregator -> agent: activation gradients + loss
    FEATURES = "features"  # aggregator -> agent, U-shape: server-half output of one batch
    FEATURE_GRADS = "feature_grads"  # agent -> aggregator, U-shape: loss gradient at it
    CLIENT_UPDATE = "client_update"  # agent -> aggregator: weights after the round
    GLOBAL_WEIGHTS = "global_weights"  # aggregator -> all: current global client half (retained)
    EVAL_REQUEST = "eval_request"  # aggregator -> agent: evaluate these weights
    EVAL_SMASHED = "eval_smashed"  # agent -> aggregator: activations of held-out data, no labels
    EVAL_PREDICTIONS = "eval_predictions"  # aggregator -> agent: predicted classes
    EVAL_RESULT = "eval_result"  # agent -> aggregator: counts only
    PREDICT = "predict"  # agent -> aggregator: activations of a live frame
    PREDICTION = "prediction"  # aggregator -> agent: the emotion for that frame
    LEAVE = "leave"  # agent -> aggregator: clean shutdown
    # With a separate fed server (aggregator/fed_server.py), which alone holds client halves:
    FED_ROUND = "fed_round"  # main server -> fed server: the round's clients and weights
    FED_PUBLISHED = "fed_published"  # fed server -> main server: client average published


class Envelope(BaseModel):
    """Message metadata; snake_case, versioned, validated on every receive."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, ge=0, le=1000, description="wire schema version")
    run_id: str = Field(pattern=ID_PATTERN, description="training run this message belongs to")
    round: int = Field(ge=0, le=1_000_000, description="federated round")
    seq: int = Field(
        ge=0, le=MAX_JSON_INT, description="sender's sequence number, strictly new per (run, src)"
    )
    message_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="uuid4 hex")
    src: str = Field(pattern=ID_PATTERN, description="sender id")
    reply_to: str = Field("", pattern=r"^([0-9a-f]{32})?$", description="message answered, if any")
    type: MsgType = Field(description="message type")
    created_at: float = Field(
        ge=0, le=1e11, allow_inf_nan=False, description="unix time of creation"
    )
    ttl: float = Field(
        0.0,
        ge=0,
        le=1e7,
        allow_inf_nan=False,
        description="seconds the message stays useful; 0 = no expiry",
    )
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
    """A received message failed validation; the text is the logged detail.

    `reason` is a short fixed category (never text from the message), so that rejections can
    be counted by reason without a peer choosing the keys.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class RejectLog:
    """Counts rejected messages by reason and logs them without letting a flood fill the log.

    At most one line per reason every `interval` seconds; the next line says how many were
    suppressed in between. `counts` is what metrics report.
    """

    def __init__(
        self,
        logger: logging.Logger,
        who: str,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.who = who
        self.interval = interval
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def reject(self, reason: str, detail: str, source: str = "?") -> bool:
        """Count one rejection; True when it was logged, False when the line was suppressed."""
        self.counts[reason] += 1
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._suppressed[reason] += 1
            return False
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        self.logger.warning(
            "%s dropped a message from %s [%s]: %s%s",
            self.who,
            source[:80],
            reason,
            detail[:300],
            f" ({suppressed} more [{reason}] since the last line)" if suppressed else "",
        )
        return True

    def admit(
        self, validator: Validator, data: bytes, sender: str, body: type[B]
    ) -> tuple[Message, B] | None:
        """The message in `data` and its body as `body`, or None: refused and counted here.

        A receiver's edge, as `ServerIO._accept` is the aggregator's: `validator` checks the
        message as published on `sender`'s topic, then its body is validated (`check_body`'s
        `bad_body`). A WireError counts under its reason and any other exception as
        `internal_error`: nothing raised while checking a peer's message gets past.
        """
        try:
            msg = validator.check(data, sender=sender)
            return msg, validate_body(msg, body)
        except WireError as e:
            self.reject(e.reason, str(e), sender)
        except Exception as e:  # noqa: BLE001 - the edge: a peer's message never ends the run
            self.reject("internal_error", f"{type(e).__name__}: {e}", sender)
        return None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


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


_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # linear: no nested quantifiers
_BRACKETS = np.zeros(256, np.int32)  # +1 for an opening bracket, -1 for a closing one
_BRACKETS[[ord("["), ord("{")]] = 1
_BRACKETS[[ord("]"), ord("}")]] = -1
_LONG_NUMBER_RE = re.compile(rb"[-+0-9.eE]{%d}" % (MAX_NUMBER_CHARS + 1))


def check_json_limits(raw: bytes, where: str, max_depth: int, max_string: int) -> None:
    """Refuse JSON that is too deep, or has too long strings or numbers, before parsing it.

    Python's json recurses (deep nesting raises RecursionError) and int() of a long literal is
    quadratic, so these are checked on the bytes: strings are matched by one linear regex and
    blanked out, and the bracket depth outside them is a cumulative sum. UTF-8 never puts an
    ASCII byte inside a multi-byte character, so scanning bytes is exact.
    """
    longest = max(map(len, _STRING_RE.findall(raw)), default=0)
    if longest - 2 > max_string:
        raise WireError(
            f"{where}: a string of {longest - 2} bytes exceeds {max_string}", "string_too_long"
        )
    rest = _STRING_RE.sub(b'""', raw)
    if rest.count(b"[") + rest.count(b"{") > max_depth:  # else it cannot nest deeper
        depth = int(np.cumsum(_BRACKETS[np.frombuffer(rest, np.uint8)]).max())
        if depth > max_depth:
            raise WireError(
                f"{where}: JSON nesting depth {depth} exceeds {max_depth}", f"{where}_depth"
            )
    if _LONG_NUMBER_RE.search(rest):
        raise WireError(f"{where}: a number of over {MAX_NUMBER_CHARS} digits", "int_too_large")


def _parse_int(text: str) -> int:
    value = int(text)  # at most MAX_NUMBER_CHARS digits: checked before parsing
    if not -MAX_JSON_INT - 1 <= value <= MAX_JSON_INT:
        raise WireError(f"integer {text[:24]}... does not fit 64 bits", "int_too_large")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"number {text[:24]} overflows a double", "non_finite_json")
    return value


def _parse_constant(text: str) -> Any:
    raise WireError(f"{text} is not allowed in JSON", "non_finite_json")


def loads_limited(raw: bytes, where: str, max_depth: int, max_string: int) -> Any:
    """json.loads with the limits above: no deep nesting, no NaN/Infinity, int64 integers."""
    check_json_limits(raw, where, max_depth, max_string)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{where} is not UTF-8", f"{where}_json") from None
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except json.JSONDecodeError as e:
        raise WireError(f"{where} is not JSON: {e}", f"{where}_json") from None


TensorSpecs = dict[str, tuple[str, tuple[int, ...]]]


def read_header(data: bytes) -> tuple[Envelope, TensorSpecs]:
    """Parse and check the safetensors header without touching tensor data.

    Sizes first (message, header length, nesting, strings, numbers, tensor count, shape
    products, byte ranges), then parsing. Whatever fails, for whatever reason, leaves as a
    WireError with a reason: this is the edge where a peer's bytes enter the process.
    """
    try:
        return _read_header(data)
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - the parser edge: no exception type may escape
        raise WireError(f"malformed header ({type(e).__name__})", "malformed") from None


def _read_header(data: bytes) -> tuple[Envelope, TensorSpecs]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(
            f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES} limit", "oversized"
        )
    if len(data) < 8:
        raise WireError("message shorter than a safetensors header", "short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise WireError(f"bad header length {n} for {len(data)} bytes", "header_length")
    raw_header = data[8 : 8 + n]
    if raw_header.count(b'"data_offsets"') > MAX_TENSORS:  # an upper bound, before parsing
        raise WireError(f"over {MAX_TENSORS} tensors", "too_many_tensors")
    header = loads_limited(raw_header, "header", MAX_JSON_DEPTH, MAX_ENVELOPE_BYTES)
    if not isinstance(header, dict):
        raise WireError("header JSON is not an object", "header_json")
    meta = header.pop("__metadata__", None)
    if (
        not isinstance(meta, dict)
        or set(meta) != {"envelope"}
        or not isinstance(meta["envelope"], str)
    ):
        raise WireError("no envelope in metadata", "bad_metadata")
    raw_env = meta["envelope"].encode("utf-8")
    env_obj = loads_limited(raw_env, "envelope", MAX_JSON_DEPTH, MAX_JSON_STRING)
    try:
        env = Envelope.model_validate(env_obj)
    except ValidationError as e:
        first = e.errors()[0]
        raise WireError(
            f"bad envelope: {'.'.join(map(str, first['loc']))}: {first['msg']}", "bad_envelope"
        ) from None
    if env.schema_version != SCHEMA_VERSION:
        raise WireError(
            f"schema version {env.schema_version}, expected {SCHEMA_VERSION}", "schema_version"
        )
    if len(header) > MAX_TENSORS:
        raise WireError(f"{len(header)} tensors exceed {MAX_TENSORS}", "too_many_tensors")
    specs: TensorSpecs = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if len(name) > MAX_TENSOR_NAME:
            raise WireError(f"tensor name of {len(name)} characters", "string_too_long")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireError(
                f"tensor {name[:40]!r}: not a dtype/shape/data_offsets entry", "tensor_spec"
            )
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise WireError(f"tensor {name[:40]!r}: unsupported dtype", "unsupported_dtype")
        shape = info["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise WireError(f"tensor {name[:40]!r}: bad shape", "bad_shape")
        count = 1
        for d in shape:  # capped at every step: a product of huge dims never grows unbounded
            count *= d
            if count > MAX_ELEMENTS:
                raise WireError(
                    f"tensor {name[:40]!r}: shape product over {MAX_ELEMENTS}", "shape_too_large"
                )
        offsets = info["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise WireError(f"tensor {name[:40]!r}: bad data_offsets", "tensor_bytes")
        begin, end = offsets
        want = count * np.dtype(_ST_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end or end - begin != want:
            raise WireError(
                f"tensor {name[:40]!r}: {end - begin} bytes for {dtype} {tuple(shape)} "
                f"({want} expected)",
                "tensor_bytes",
            )
        ranges.append((begin, end, name))
        specs[name] = (dtype, tuple(shape))
    # safetensors lays tensors out back to back, covering the whole buffer after the header.
    pos = 0
    for begin, end, name in sorted(ranges):
        if begin != pos:
            raise WireError(f"tensor {name[:40]!r}: data does not follow on", "tensor_bytes")
        pos = end
    if pos != len(data) - 8 - n:
        raise WireError(
            f"tensor data of {len(data) - 8 - n} bytes, header describes {pos}", "tensor_bytes"
        )
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
        raise WireError(f"corrupt tensor data: {e}", "corrupt_tensor") from None
    return Message(env, dict(tensors))


class Validator:
    """Checks every received message against what the receiver expects right now.

    Schema, size, dtype, shape, finite values, known sender (and the topic it came on), current
    run and round, and a message not seen before. `check` raises WireError with the reason.

    Replays are caught by sequence number and by message id; the ids are remembered in a
    window bounded by count and age, oldest forgotten first, so the window never empties at
    once (which would let every recent message be replayed).
    """

    def __init__(
        self,
        run_id: str,
        specs: Mapping[MsgType, ShapeSpec | Callable[[Envelope], ShapeSpec]],
        known_sender: Callable[[str], bool] = lambda _: True,
        round_ok: Callable[[Envelope], bool] = lambda _: True,
        max_batch: int = 1024,
        replay_window: int = 100_000,
        replay_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_id = run_id
        self.specs = dict(specs)
        self.known_sender = known_sender
        self.round_ok = round_ok
        self.max_batch = max_batch
        self.replay_window = replay_window
        self.replay_seconds = replay_seconds
        self.clock = clock
        self._last_seq: dict[str, int] = {}
        self._seen_ids: OrderedDict[str, float] = OrderedDict()  # id -> when first accepted

    def seen(self, message_id: str) -> bool:
        """Whether `message_id` is still inside the replay window."""
        self._expire()
        return message_id in self._seen_ids

    def _expire(self) -> None:
        horizon = self.clock() - self.replay_seconds
        ids = self._seen_ids
        while ids and (len(ids) > self.replay_window or next(iter(ids.values())) < horizon):
            ids.popitem(last=False)

    def check(self, data: bytes, sender: str | None = None) -> Message:
        """The message in `data`, checked; `sender` is who the transport says sent it."""
        try:
            return self._check(data, sender)
        except WireError:
            raise
        except Exception as e:  # noqa: BLE001 - the parser edge: no exception type may escape
            raise WireError(f"check failed ({type(e).__name__}: {e})"[:300], "malformed") from None

    def _check(self, data: bytes, sender: str | None) -> Message:
        env, specs = read_header(data)
        if sender is not None and env.src != sender:
            raise WireError(f"sender {env.src!r} published on {sender!r}'s topic", "spoofed_sender")
        if env.run_id != self.run_id:
            raise WireError(
                f"run {env.run_id!r} is not the current run {self.run_id!r}", "other_run"
            )
        if env.type not in self.specs:
            raise WireError(f"unexpected message type {env.type.value!r}", "unexpected_type")
        if env.type is not MsgType.JOIN and not self.known_sender(env.src):
            raise WireError(f"unknown client {env.src!r}", "unknown_sender")
        if env.ttl and time.time() > env.created_at + env.ttl:
            raise WireError("message expired (ttl)", "expired")
        # A JOIN starts a sender's sequence afresh (an agent that restarted); replays of it are
        # still caught by their message id.
        stale = env.type is not MsgType.JOIN and env.seq <= self._last_seq.get(env.src, 0)
        if stale or self.seen(env.message_id):
            raise WireError(f"replayed or out-of-order seq {env.seq} from {env.src!r}", "replay")
        if not self.round_ok(env):
            raise WireError(
                f"{env.type.value} for round {env.round} is not for the current round",
                "other_round",
            )
        spec = self.specs[env.type]
        try:
            expected = spec(env) if callable(spec) else spec
        except Exception as e:  # noqa: BLE001 - a spec is built from the peer's body
            raise WireError(
                f"bad {env.type.value} body: {type(e).__name__}: {e}"[:300], "bad_body"
            ) from None
        if set(specs) != set(expected):
            raise WireError(
                f"tensors {sorted(specs)[:8]} != expected {sorted(expected)[:8]}", "tensor_names"
            )
        for name, (dtype, shape) in specs.items():
            dtypes, pattern = expected[name]
            if dtype not in dtypes:
                raise WireError(
                    f"tensor {name!r}: dtype {dtype} not in {sorted(dtypes)}", "wrong_dtype"
                )
            if len(shape) != len(pattern) or any(
                p != -1 and p != s for p, s in zip(pattern, shape)
            ):
                raise WireError(
                    f"tensor {name!r}: shape {shape} does not match {pattern}", "wrong_shape"
                )
            if pattern and pattern[0] == -1 and not 1 <= shape[0] <= self.max_batch:
                raise WireError(
                    f"tensor {name!r}: batch {shape[0]} outside 1..{self.max_batch}", "batch_size"
                )
        msg = decode(data)
        for name, arr in msg.tensors.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise WireError(f"tensor {name!r} has non-finite values", "non_finite")
        batch_sizes = {a.shape[0] for n, a in msg.tensors.items() if expected[n][1][:1] == (-1,)}
        if len(batch_sizes) > 1:
            raise WireError(
                f"tensors disagree on batch size: {sorted(batch_sizes)}", "batch_mismatch"
            )
        self._last_seq[env.src] = env.seq
        self._seen_ids[env.message_id] = self.clock()
        self._expire()
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


MAX_COUNT = 10_000_000  # samples, steps or frames a body may report
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class JoinBody(_Body):
    client_id: str = Field(pattern=ID_PATTERN)
    n_train: Count
    n_test: Count
    class_counts: list[Count] = Field(min_length=7, max_length=7)
    input_shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=3, max_length=3)


class SmashedBody(_Body):
    step: Count


class UpdateBody(_Body):
    n_samples: Count
    steps: Count
    seen: Count
    full: bool = False
    loss_sum: float = Field(0.0, ge=0, le=1e12, allow_inf_nan=False)
    correct: Count = 0


class EvalSmashedBody(_Body):
    split: Literal["train", "test"]
    step: Count
    steps: Annotated[int, Field(ge=1, le=MAX_COUNT)]


class EvalResultBody(_Body):
    split: Literal["train", "test"]
    confusion: list[Annotated[list[Count], Field(min_length=7, max_length=7)]] = Field(
        min_length=7, max_length=7
    )


class PredictBody(_Body):
    frame: Annotated[int, Field(ge=0, le=MAX_JSON_INT)]


class LeaveBody(_Body):
    reason: str = Field("stopped", max_length=200)


BODY_MODELS: dict[MsgType, type[_Body]] = {
    MsgType.JOIN: JoinBody,
    MsgType.SMASHED: SmashedBody,
    MsgType.FEATURE_GRADS: SmashedBody,  # U-shape: {step} of the batch
    MsgType.CLIENT_UPDATE: UpdateBody,
    MsgType.EVAL_SMASHED: EvalSmashedBody,
    MsgType.EVAL_RESULT: EvalResultBody,
    MsgType.PREDICT: PredictBody,
    MsgType.LEAVE: LeaveBody,
}


def validate_body(msg: Message, model: type[B]) -> B:
    """The JSON body of `msg` as `model`; a WireError `bad_body` naming the field if not."""
    try:
        return model.model_validate(msg.env.body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise WireError(
            f"bad {msg.type.value} body: {where + ': ' if where else ''}{first['msg']}", "bad_body"
        ) from None


def check_body(msg: Message) -> _Body:
    """Validate the JSON body of a message the aggregator received."""
    model = BODY_MODELS.get(msg.type)
    if model is None:
        raise WireError(f"no body schema for {msg.type.value}", "unexpected_type")
    return validate_body(msg, model)
