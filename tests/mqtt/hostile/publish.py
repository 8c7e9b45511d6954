"""Publishing hostile messages: the publisher process (`python -m tests.mqtt.hostile ...`) and
the files of messages a test hands it to replay."""

from __future__ import annotations

import argparse
import json
import struct
import time
from pathlib import Path

import numpy as np

from .agent import agent_junk
from .base import Pair, Sender, read_spec
from .classes import ALL_CLASSES


def write_pairs(path: Path, pairs: list[Pair]) -> None:
    """Messages to a file (length-prefixed topic and payload), for a publisher to replay."""
    with path.open("wb") as f:
        for name, payload in pairs:
            t = name.encode()
            f.write(struct.pack("<II", len(t), len(payload)) + t + payload)


def read_pairs(path: Path) -> list[Pair]:
    data = path.read_bytes()
    out: list[Pair] = []
    pos = 0
    while pos < len(data):
        nt, np_ = struct.unpack_from("<II", data, pos)
        pos += 8
        out.append((data[pos : pos + nt].decode(), data[pos + nt : pos + nt + np_]))
        pos += nt + np_
    return out


def publish(broker: str, pairs: list[Pair], client_id: str, timeout: float = 60.0) -> None:
    """Publish at QoS 1 as fast as the broker takes them, and wait until it has them all."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = broker.rsplit("/", 1)[-1].split(":")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(host, int(port))
    c.loop_start()
    try:
        infos = [c.publish(name, payload, qos=1) for name, payload in pairs]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    finally:
        c.disconnect()
        c.loop_stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    p.add_argument("--spec", type=Path, required=True, help="JSON from write_spec")
    p.add_argument("--classes", default="", help="comma-separated names from CLASSES")
    p.add_argument("--count", type=int, default=100, help="hostile messages per class")
    p.add_argument("--agents", default="", help="comma-separated client ids to send junk to")
    p.add_argument("--replay", type=Path, help="a write_pairs file to publish twice, as replays")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--report", type=Path, required=True, help="JSON: hostile messages sent, by class"
    )
    a = p.parse_args(argv)
    t = read_spec(a.spec)
    rng = np.random.default_rng(a.seed)
    sent: dict[str, int] = {}
    setup: list[Pair] = []
    hostile: list[Pair] = []
    markers: dict[str, str] = {}  # sender -> what the aggregator logs for its closing JOIN
    closing: list[Pair] = []
    for name in filter(None, a.classes.split(",")):
        batch = ALL_CLASSES[name].make(t, rng, a.count)
        setup += batch.setup
        hostile += batch.hostile
        sent[name] = len(batch.hostile)
        if batch.sender is not None:
            # Accepted after the class's every message (one topic is one ordered queue), so
            # the aggregator's log line says when the whole class has been dealt with.
            joined = any(topic == t.up(batch.sender) for topic, _ in batch.setup)
            markers[batch.sender] = "re-joined" if joined else "joined"
            closing.append((t.up(batch.sender), Sender(t, batch.sender).join()))
    for cid in filter(None, a.agents.split(",")):
        batch = agent_junk(t, rng, a.count, cid)
        hostile += batch.hostile
        sent[f"agent:{cid}"] = len(batch.hostile)
    if a.replay is not None:
        copies = read_pairs(a.replay) * 2
        hostile += copies
        sent["honest_replay"] = len(copies)
    publish(a.broker, setup, f"hostile-setup-{a.seed}")  # JOINs first, and all of them in
    publish(a.broker, hostile + closing, f"hostile-{a.seed}")
    a.report.write_text(json.dumps({"sent": sent, "markers": markers}))


if __name__ == "__main__":
    main()
