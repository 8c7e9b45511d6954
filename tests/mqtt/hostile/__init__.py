"""Hostile MQTT messages, one generator per class, and a publisher that runs as its own process.

The fuzz test (and the chaos soak) start `python -m tests.mqtt.hostile ...` next to a real run:
each class publishes under its own sender id (so that one class's sequence numbers or inbox
share never change another's outcome) and says, in `CLASSES`, which reasons the aggregator must
count it under (`rejected_by_reason`, or the transport's `dropped` for topic-level junk).
Classes that need a known sender first send a JOIN without training data (`setup`), which is
accepted and not counted as hostile; each class ends with a JOIN on its topic, whose log line
("client h-... joined" / "re-joined") tells that the aggregator has been through the class.

Only `splitfed.wire` and paho are imported: no torch, so a publisher starts in a blink. The
model's shapes come from a JSON spec file written by the test (`write_spec`).
"""

from __future__ import annotations

from .agent import AGENT_REASONS, AGENT_U_REASONS, AGENT_U_RUN_REASONS
from .base import Target, write_spec
from .classes import (
    ALL_CLASSES,
    CLASSES,
    FED_SERVER_CLASSES,
    MAIN_FED_CLASSES,
    U_CLASSES,
    HostileClass,
)
from .publish import write_pairs

__all__ = [
    "AGENT_REASONS", "AGENT_U_REASONS", "AGENT_U_RUN_REASONS", "ALL_CLASSES", "CLASSES",
    "FED_SERVER_CLASSES", "HostileClass", "MAIN_FED_CLASSES", "Target", "U_CLASSES", "write_pairs",
    "write_spec",
]  # fmt: skip
