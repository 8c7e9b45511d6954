"""Every hostile class by name, with the reasons its receiver must count it under."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import aggregator as agg
from . import fed
from .base import Batch, Target


@dataclass(frozen=True)
class HostileClass:
    make: Callable[[Target, np.random.Generator, int], Batch]
    reasons: frozenset[str]  # where the aggregator must count it (empty: any reason)
    counted: str = "rejected"  # "rejected" (ServerIO) or "dropped" (MqttTransport)


def _c(make: Callable[..., Batch], *reasons: str, counted: str = "rejected") -> HostileClass:
    return HostileClass(make, frozenset(reasons), counted)


CLASSES: dict[str, HostileClass] = {
    "deep_header": _c(agg.deep_header, "header_depth"),
    "deep_envelope": _c(agg.deep_envelope, "envelope_depth"),
    "huge_ints": _c(agg.huge_ints, "int_too_large"),
    "bounded_ints": _c(agg.bounded_ints, "bad_envelope", "bad_body"),
    "shape_overflow": _c(agg.shape_overflow, "shape_too_large"),
    "lying_length": _c(agg.lying_length, "header_length", "header_json", "tensor_bytes"),
    "wrong_dtype": _c(agg.wrong_dtype, "wrong_dtype"),
    "tensor_bytes": _c(agg.tensor_bytes, "tensor_bytes"),
    "replay": _c(agg.replay, "replay"),
    "other_run": _c(agg.other_run, "other_run"),
    "other_round": _c(agg.other_round, "other_round"),
    "spoofed_sender": _c(agg.spoofed_sender, "spoofed_sender"),
    "unknown_sender": _c(agg.unknown_sender, "unknown_sender"),
    "wrong_type": _c(agg.wrong_type, "unexpected_type"),
    "non_finite_tensor": _c(agg.non_finite_tensor, "non_finite"),
    "non_finite_json": _c(agg.non_finite_json, "non_finite_json"),
    "too_many_tensors": _c(agg.too_many_tensors, "too_many_tensors"),
    "long_strings": _c(agg.long_strings, "string_too_long"),
    "garbage": _c(agg.garbage),
    "truncated": _c(agg.truncated),
    "bitflip": _c(agg.bitflip),
    "flood": _c(agg.flood, "expired", "sender_over_budget"),
    "bad_topic": _c(agg.bad_topic, "bad_status", "foreign_topic", counted="dropped"),
    "feature_grads_standard": _c(agg.feature_grads_standard, "unexpected_type"),
}

# Against a U-shaped run (`serve --shape u`): FEATURES go down, FEATURE_GRADS come up.
U_CLASSES: dict[str, HostileClass] = {
    "feature_grads_shape": _c(agg.feature_grads_shape, "wrong_shape", "tensor_names", "batch_size"),
    "feature_grads_dtype": _c(agg.feature_grads_dtype, "wrong_dtype"),
    "feature_grads_non_finite": _c(agg.feature_grads_non_finite, "non_finite"),
    "feature_grads_round": _c(agg.feature_grads_round, "other_round"),
    "feature_grads_step": _c(agg.feature_grads_step, "bad_body"),
    "feature_grads_unasked": _c(agg.feature_grads_unasked, "unasked"),
    "feature_grads_oversized": _c(agg.feature_grads_oversized, "shape_too_large", "batch_size"),
    "features_up": _c(agg.features_up, "unexpected_type"),
}
ALL_CLASSES = {**CLASSES, **U_CLASSES}

# With a separate fed server. Deliberately not in ALL_CLASSES: the fuzz and soak runs have no
# fed server (their aggregator reads neither `aggregator/sync` nor `fed-server/sync`), and
# these classes sign as the main server or the fed server from sequence 1, which only a
# receiver that has heard neither yet takes in order. tests/mqtt/test_fed_fuzz.py feeds each
# class to its receiver in-process and then checks that a genuine message still gets through.
# Received by the fed server (counted in `FedServer.rejects`):
FED_SERVER_CLASSES: dict[str, HostileClass] = {
    "fed_round_clients": _c(fed.fed_round_clients, "bad_body"),
    "fed_round_weights": _c(fed.fed_round_weights, "bad_body", "int_too_large"),
    "fed_round_fields": _c(fed.fed_round_fields, "bad_body"),
    "fed_round_envelope": _c(fed.fed_round_envelope, "bad_envelope", "expired"),
    "fed_round_version": _c(fed.fed_round_version, "wrong_version"),
    "fed_round_forged": _c(
        fed.fed_round_forged,
        "spoofed_sender",
        "unexpected_type",
        "replay",
        "other_run",
        "tensor_names",
    ),
}
# Received by the main server (`aggregator serve --fed-server`, in `MainFedLink.rejects`):
MAIN_FED_CLASSES: dict[str, HostileClass] = {
    "fed_published_version": _c(
        fed.fed_published_version, "bad_body", "int_too_large", "unasked", "replay"
    ),
    "fed_published_fields": _c(fed.fed_published_fields, "bad_body", "string_too_long"),
    "fed_published_forged": _c(
        fed.fed_published_forged,
        "spoofed_sender",
        "other_run",
        "tensor_names",
        "unexpected_type",
        "expired",
    ),
}
