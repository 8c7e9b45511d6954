"""Bounded, fair inboxes: a flooding sender loses its excess, the others still get through."""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import Agent
from splitfed.client import ClientRuntime
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.mqtt import FairInbox, LinkSettings, MqttTransport
from splitfed.server import AGGREGATOR_ID
from splitfed.wire import MsgType, Sequencer, encode

from .fed import Mosquitto


def test_fair_inbox_bounds_each_sender_and_serves_them_in_turn() -> None:
    box: FairInbox[str] = FairInbox(max_items=100, max_bytes=10_000, sender_items=10)
    flood = [box.put("flooder", f"f{i}", 10) for i in range(50)]
    honest = [box.put("honest", f"h{i}", 10) for i in range(5)]
    assert flood.count(None) == 10 and flood.count("sender_over_budget") == 40
    assert honest == [None] * 5
    got = [box.get(0) for _ in range(15)]
    # one from each waiting sender in turn, each sender's own order kept
    assert got[:10] == ["f0", "h0", "f1", "h1", "f2", "h2", "f3", "h3", "f4", "h4"]
    assert got[10:] == ["f5", "f6", "f7", "f8", "f9"]
    assert box.get(0) is None and len(box) == 0 and box.bytes == 0


def test_fair_inbox_bounds_bytes_per_sender_and_in_total() -> None:
    box: FairInbox[int] = FairInbox(max_items=1000, max_bytes=1000, sender_bytes=300)
    assert box.put("a", 0, 500) is None  # a sender's first item only needs room in the total
    assert box.put("a", 1, 10) == "sender_over_budget"
    assert box.put("b", 2, 200) is None and box.put("b", 3, 100) is None
    assert box.put("b", 4, 1) == "sender_over_budget"
    assert box.put("c", 5, 201) == "inbox_bytes"  # 500 + 300 + 201 > 1000
    assert box.put("c", 6, 200) is None
    assert box.bytes == 1000
    assert [box.get(0) for _ in range(4)] == [0, 2, 6, 3]
    assert box.put("a", 7, 300) is None  # room again once consumed


def test_mqtt_flood_from_one_sender_is_dropped_with_a_reason_while_others_get_through(
    mosquitto: Mosquitto,
) -> None:
    transport = MqttTransport(
        LinkSettings.from_url(mosquitto.url),
        "splitfed",
        "inbox",
        presence_grace=0,
        inbox_bytes=8 * 1024 * 1024,
        sender_inbox_bytes=1024 * 1024,
    )
    assert transport.start(wait=10)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv311)
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        # Nobody consumes meanwhile: 100 x 64 KB from one sender against a 1 MiB share.
        infos = [
            pub.publish("splitfed/inbox/flooder/up", bytes(64 * 1024), qos=1) for _ in range(100)
        ]
        infos += [
            pub.publish("splitfed/inbox/client-00/up", b"honest %d" % i, qos=1) for i in range(5)
        ]
        for info in infos:
            info.wait_for_publish(30)
        deadline = time.monotonic() + 30
        while (
            transport.messages_up < 105 and time.monotonic() < deadline
        ):  # received, queued or not
            time.sleep(0.05)
        assert transport.dropped["sender_over_budget"] == 100 - 16, dict(transport.dropped)
        assert transport.inbox.bytes <= 1024 * 1024 + 5 * 8
        got = []
        while (ev := transport.recv(0.5)) is not None:
            got.append(ev)
        honest = [ev.data for ev in got if ev.client_id == "client-00"]
        assert honest == [b"honest %d" % i for i in range(5)]
        assert sum(ev.client_id == "flooder" for ev in got) == 16
        # the honest sender's messages came in turn with the flood's, not after all of it
        order = [ev.client_id for ev in got]
        assert order.index("client-00") <= 1 and order[:10].count("client-00") == 5
    finally:
        pub.disconnect()
        pub.loop_stop()
        transport.close()


def _agent(**kw: Any) -> Agent:
    ds = generate_synth(SynthConfig(identities=2))
    runtime = ClientRuntime("client-00", "inbox", ds, None)
    return Agent(runtime, LinkSettings(), "splitfed", "inbox", **kw)


def test_agent_inbox_is_bounded_per_topic_in_bytes_and_the_status_still_gets_in() -> None:
    agent = _agent(inbox_bytes=1024 * 1024)  # half of it for any one topic
    for _ in range(20):
        agent._on_message("splitfed/inbox/client-00/down", bytes(64 * 1024))
    agent._on_message("splitfed/inbox/aggregator/status", b"stopped")
    assert agent.rejects.counts == {"sender_over_budget": 20 - 8}
    assert agent.counters["rejected"] == 12
    got = [agent.inbox.get(0) for _ in range(3)]
    assert [(g[0], g[1]) for g in got if g] == [
        ("client-00", "down"),
        ("aggregator", "status"),
        ("client-00", "down"),
    ]


def test_agent_dispatch_turns_every_failure_into_a_rejection_by_reason() -> None:
    agent = _agent()
    deep = b"[" * 100_000
    agent.dispatch("client-00", "down", struct.pack("<Q", len(deep)) + deep)
    stranger = Sequencer("h-stranger", "inbox")
    grad = encode(stranger.make(MsgType.GRADIENTS, 0, {"step": 0}, {"grad": np.zeros((1, 2))}))
    agent.dispatch("client-00", "down", grad)
    other = Sequencer(AGGREGATOR_ID, "other-run")
    agent.dispatch("client-00", "down", encode(other.make(MsgType.GRADIENTS, 0, {"step": 0})))
    bad = Sequencer(AGGREGATOR_ID, "inbox").make(MsgType.PREDICTION, 0, {"frame": "x"})
    agent.dispatch("client-00", "down", encode(bad))
    assert agent.counters["rejected"] == 4
    reasons = agent.stats()["rejected_by_reason"]
    assert reasons == {
        "header_depth": 1,
        "unknown_sender": 1,
        "other_run": 1,
        "tensor_names": 1,
    }, reasons
