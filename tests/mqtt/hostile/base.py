"""What every hostile class builds on: the run it attacks, its senders, hand-made messages."""

from __future__ import annotations

import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitfed.wire import MsgType, Sequencer, encode

Pair = tuple[str, bytes]  # (topic, payload)
AGGREGATOR = "aggregator"  # the aggregator's sender id (splitfed.server.AGGREGATOR_ID)
DTYPES: dict[str, type] = {"F32": np.float32, "I64": np.int64}


@dataclass
class Target:
    """What a hostile publisher needs to know about the run it attacks."""

    run_id: str
    prefix: str
    smashed: tuple[int, ...]  # one sample's activations at the cut
    input_shape: tuple[int, ...]
    weights: dict[str, tuple[str, tuple[int, ...]]]  # client half: wire name -> dtype, shape
    features: int = 0  # U-shape: width of the server half's features (FEATURES, FEATURE_GRADS)
    # With a fed server (FED_SERVER_CLASSES, MAIN_FED_CLASSES): the round the main server asks
    # the fed server to average, and a valid FED_ROUND body of it (phase "round") to tamper with.
    fed_round: int = 0
    fed_body: dict[str, Any] = field(default_factory=dict)

    def up(self, cid: str) -> str:
        return f"{self.prefix}/{self.run_id}/{cid}/up"

    def down(self, cid: str) -> str:
        return f"{self.prefix}/{self.run_id}/{cid}/down"

    def sync(self, cid: str) -> str:
        """FED_ROUND comes on `aggregator/sync`, FED_PUBLISHED on `fed-server/sync`."""
        return f"{self.prefix}/{self.run_id}/{cid}/sync"

    def weights_topic(self, cid: str) -> str:
        """A device's client half, for the fed server alone."""
        return f"{self.prefix}/{self.run_id}/{cid}/weights"

    def zero_weights(self, dtype: type | None = None) -> dict[str, np.ndarray]:
        """The client half's tensors, zero, in their own dtype or all in `dtype`."""
        return {k: np.zeros(shape, dtype or DTYPES[dt]) for k, (dt, shape) in self.weights.items()}


@dataclass
class Batch:
    """A class's messages: `setup` (accepted, e.g. a JOIN) goes first, `hostile` is counted."""

    setup: list[Pair] = field(default_factory=list)
    hostile: list[Pair] = field(default_factory=list)
    sender: str | None = None  # whose topic carries the class; main() ends it with a JOIN


def write_spec(path: Path, target: Target) -> None:
    data = {**target.__dict__, "weights": {k: [d, list(s)] for k, (d, s) in target.weights.items()}}
    path.write_text(json.dumps(data))


def read_spec(path: Path) -> Target:
    d = json.loads(path.read_text())
    return Target(
        d["run_id"],
        d["prefix"],
        tuple(d["smashed"]),
        tuple(d["input_shape"]),
        {k: (dt, tuple(shape)) for k, (dt, shape) in d["weights"].items()},
        int(d.get("features", 0)),
        int(d.get("fed_round", 0)),
        dict(d.get("fed_body", {})),
    )


# ---- building blocks ---------------------------------------------------------------------------


class Sender:
    """One hostile sender id: its sequence, its JOIN, and envelopes to tamper with."""

    def __init__(self, t: Target, cid: str) -> None:
        self.t = t
        self.cid = cid
        self.seq = Sequencer(cid, t.run_id)

    @property
    def topic(self) -> str:
        return self.t.up(self.cid)

    def join(self, client_id: str | None = None) -> bytes:
        body = {
            "client_id": client_id or self.cid,
            "n_train": 0,
            "n_test": 0,
            "class_counts": [0] * 7,
            "input_shape": list(self.t.input_shape),
        }
        return encode(self.seq.make(MsgType.JOIN, 0, body))

    def msg(
        self,
        type: MsgType,
        tensors: dict[str, np.ndarray] | None = None,
        round: int = 0,
        **body: Any,
    ) -> bytes:
        return encode(self.seq.make(type, round, body, tensors))

    def env(self, type: MsgType, round: int = 0, **body: Any) -> dict[str, Any]:
        """A valid envelope as a dict, with a fresh sequence number, for raw messages."""
        self.seq.seq += 1
        return {
            "schema_version": 1,
            "run_id": self.t.run_id,
            "round": round,
            "seq": self.seq.seq,
            "message_id": uuid.uuid4().hex,
            "src": self.cid,
            "reply_to": "",
            "type": type.value,
            "created_at": time.time(),
            "ttl": 0.0,
            "body": body,
        }


def raw(
    env: dict[str, Any] | str, tensors: dict[str, dict[str, Any]] | None = None, data: bytes = b""
) -> bytes:
    """A safetensors file built by hand, so that its header can lie."""
    envelope = env if isinstance(env, str) else json.dumps(env)
    header = json.dumps({"__metadata__": {"envelope": envelope}, **(tensors or {})}).encode()
    return struct.pack("<Q", len(header)) + header + data


def activations(t: Target, rng: np.random.Generator, batch: int = 1) -> np.ndarray:
    return rng.standard_normal((batch, *t.smashed)).astype(np.float32)


def smashed(t: Target, rng: np.random.Generator, batch: int = 1) -> dict[str, np.ndarray]:
    return {"activations": activations(t, rng, batch), "labels": np.zeros(batch, np.int64)}


def act_entry(t: Target, batch: int = 1, offsets: tuple[int, int] | None = None) -> dict[str, Any]:
    n = 4 * batch * int(np.prod(t.smashed))
    return {"dtype": "F32", "shape": [batch, *t.smashed], "data_offsets": list(offsets or (0, n))}


def joined(t: Target, name: str) -> tuple[Sender, Batch]:
    s = Sender(t, f"h-{name}")
    return s, Batch(setup=[(s.topic, s.join())], sender=s.cid)


def huge_int(rng: np.random.Generator) -> int:
    sign = -1 if rng.random() < 0.3 else 1
    return sign * (2**63 + int(rng.integers(0, 2**62))) * int(10 ** rng.integers(0, 25))


def other_run_target(t: Target) -> Target:
    return Target(f"{t.run_id}-other", t.prefix, t.smashed, t.input_shape, t.weights, t.features)


def feature_grad(
    t: Target, rng: np.random.Generator, batch: int = 1, dtype: type = np.float32
) -> Any:
    return rng.standard_normal((batch, max(t.features, 1))).astype(dtype)


def forged_aggregator(t: Target, i: int) -> Sender:
    """The aggregator's id with a sequence far ahead of the real one: accepted, it would
    block the real aggregator; refused, it must leave no trace (neither seq nor round)."""
    fake = Sender(t, AGGREGATOR)
    fake.seq.seq = 2**62 + i  # (a real aggregator counts from its start time in microseconds)
    return fake
