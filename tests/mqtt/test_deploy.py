"""PyVertical and FedSL deployed: `aggregator serve` and `edge-agent --role owner|segment`
processes train through a real Mosquitto and give `aggregator simulate`'s numbers exactly.

PyVertical's private set intersection runs over MQTT as ordinary wire messages; a tap on `#`
checks that no record id outside the intersection reaches the wire, and no pixel either. The
fast tests first check that each role's agent builds exactly its simulated twin's data.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from splitfed.wire import WireError, decode

from .fed import AGENT_CMD, IDENTITIES, THREADS, Mosquitto, Procs, Tap, read_metrics, serve_cmd
from .test_e2e import assert_equal_metrics

OWNERS = 2
# Record ids as splitfed.data.vertical makes them: pseudonyms of pictures, and the ids of
# records only one party holds.
RECORD_ID = re.compile(rb"r[0-9a-f]{20}|x\d{2}-\d{6}-[0-9a-f]{8}")


def role_cmd(url: str, client_id: str, run_id: str, *role: str) -> list[str]:
    """An edge agent of `role` on the synthetic set the reference simulation uses."""
    return [*AGENT_CMD, "--broker", url, "--client-id", client_id, *role, "--dataset", "synth",
            "--synth-identities", str(IDENTITIES), "--seed", "0", "--threads", str(THREADS),
            "--run-id", run_id, "--exit-when-done"]  # fmt: skip


def serve(procs: Procs, out: Path, url: str, algo: str, devices: int, run_id: str,
          *extra: str) -> None:  # fmt: skip
    cmd = serve_cmd(out, url, algo, devices, 2, run_id, "--synth-identities", str(IDENTITIES),
                    "--round-timeout", "120", *extra)  # fmt: skip
    procs.start("aggregator", cmd)


def finish(procs: Procs, agents: list[str], out: Path) -> dict[str, Any]:
    assert procs.wait("aggregator", 300) == 0, procs.logs()
    for name in agents:  # --exit-when-done: they leave when the aggregator stops
        assert procs.wait(name, 60) == 0, procs.logs()
    return read_metrics(out)


def vertical_ids() -> tuple[set[str], set[str]]:
    """(every record id some party holds, the intersection), as the parties compute them."""
    from splitfed.algorithms.pyvertical.parties import PartySpec, vertical_parties
    from splitfed.data.synth import SynthConfig, generate_synth

    parties = vertical_parties(generate_synth(SynthConfig(identities=IDENTITIES)),
                               PartySpec(OWNERS, 0))  # fmt: skip
    every = set(parties.labels.ids.tolist())
    for o in parties.owners:
        every |= set(o.ids.tolist())
    return every, parties.true_intersection()


@pytest.mark.mqtt
@pytest.mark.slow
def agent_config(**overrides: Any) -> Any:
    from edge_agent.config import load_config

    base = {"data.dataset": "synth", "data.synth_identities": IDENTITIES, "data.seed": 0}
    return load_config(None, {**base, **overrides})


def test_owner_agent_holds_its_simulated_twins_part() -> None:
    from edge_agent.cli import owner_table
    from splitfed.algorithms.pyvertical.parties import PartySpec, label_holder, vertical_parties
    from splitfed.data.synth import SynthConfig, generate_synth

    ds = generate_synth(SynthConfig(identities=IDENTITIES))
    sim = vertical_parties(ds, PartySpec(OWNERS, 0))
    for k in range(OWNERS):
        cfg = agent_config(client_id=f"owner-{k:02d}", role="owner", **{"owner.index": k})
        table = owner_table(cfg)
        assert table.box == sim.owners[k].box
        assert table.ids.tolist() == sim.owners[k].ids.tolist()
        assert np.array_equal(table.images, sim.owners[k].images)
    labels, model = label_holder(ds, PartySpec(OWNERS, 0))
    assert labels.ids.tolist() == sim.labels.ids.tolist()
    assert np.array_equal(labels.labels, sim.labels.labels)
    assert [tuple(b) for b in model.boxes] == sim.boxes


def test_segment_agent_holds_its_simulated_twins_frames() -> None:
    from edge_agent.cli import segment_runtime
    from splitfed.data.clips import clips_for, shard_indices
    from splitfed.data.synth import SynthConfig, generate_synth

    clips = clips_for(generate_synth(SynthConfig(identities=IDENTITIES)), 4)
    _, _, shards = shard_indices(clips.labels, clips.subjects, 2, "subject", "subject", 0)
    tr, te = shards[1]
    for k, (t0, t1) in enumerate(((0, 2), (2, 4))):
        seg = {"segment.group": 1, "segment.groups": 2, "segment.segment": k}
        rt = segment_runtime(agent_config(client_id=f"c-01-s{k}", role="segment", **seg))
        assert np.array_equal(rt.train, clips.clips[tr, t0:t1])
        assert np.array_equal(rt.test, clips.clips[te, t0:t1])
        assert rt.is_last == (k == 1)
    assert rt.train_labels is not None and np.array_equal(rt.train_labels, clips.labels[tr])


def test_roles_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    from edge_agent.cli import run_agent
    from splitfed.errors import UserError

    with pytest.raises(UserError, match="owner index 2"):
        agent_config(client_id="o", role="owner", **{"owner.index": 2, "owner.owners": 2})
    with pytest.raises(UserError, match="segment 2"):
        agent_config(client_id="s", role="segment", **{"segment.segment": 2})
    cfg = agent_config(client_id="o", role="owner", **{"live.enabled": True, "camera.source":
                       str(tmp_path / "none.mp4")})  # fmt: skip
    with pytest.raises(UserError, match="holds none"):
        run_agent(cfg)


def test_pyvertical_owners_over_mosquitto_equal_simulate(
    mosquitto: Mosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    run_id, out = "deploy-pyvertical", tmp_path / "out"
    owners = [f"owner-{i:02d}" for i in range(OWNERS)]
    tap = Tap(mosquitto.url)
    try:
        serve(procs, out, mosquitto.url, "pyvertical", OWNERS, run_id)
        for i, cid in enumerate(owners):
            role = ("--role", "owner", "--owner-index", str(i), "--owners", str(OWNERS))
            procs.start(cid, role_cmd(mosquitto.url, cid, run_id, *role))
        metrics = finish(procs, owners, out)
    finally:
        tap.close()
    ref = reference("pyvertical", clients=OWNERS)
    assert_equal_metrics(metrics, ref)
    assert metrics["psi"]["intersection"] == ref["psi"]["intersection"] > 0
    assert metrics["psi"]["owner_records"] == ref["psi"]["owner_records"]
    assert metrics["comm"]["rejected_messages"] == 0 and metrics["comm"]["transport_dropped"] == 0

    # The wire: PSI in the clear only as encrypted sets; ids only of the intersection.
    every, common = vertical_ids()
    outside = every - common
    assert outside and metrics["psi"]["intersection"] == len(common)
    found: set[str] = set()
    types: set[str] = set()
    for name, payload, _, _ in tap.snapshot():
        found |= {m.decode() for m in RECORD_ID.findall(payload)}
        if name.endswith(("/up", "/down")):
            try:
                msg = decode(payload)
            except WireError as e:
                pytest.fail(f"undecodable payload on {name}: {e}")
            types.add(f"{msg.type.value}:{msg.env.body.get('phase', '')}")
            for k, a in msg.tensors.items():  # no crop and no owner's part crosses
                assert tuple(a.shape[-2:]) not in ((48, 96), (48, 48)), (name, k, a.shape)
    leaked = found & outside
    assert not leaked, f"{len(leaked)} record ids outside the intersection on the wire"
    assert found & common, "the alignment lists (the intersection's ids) should cross"
    assert {"round_start:psi", "client_update:psi", "round_start:align"} <= types, types


@pytest.mark.mqtt
@pytest.mark.slow
def test_fedsl_segments_over_mosquitto_equal_simulate(
    mosquitto: Mosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    """One client group of two segment devices; the aggregator relays the hidden state."""
    run_id, out, segments = "deploy-fedsl", tmp_path / "out", 2
    devices = [f"client-00-s{k}" for k in range(segments)]
    tap = Tap(mosquitto.url)
    try:
        serve(procs, out, mosquitto.url, "fedsl", segments, run_id, "--segments", str(segments),
              "--frames", "4")  # fmt: skip
        for k, cid in enumerate(devices):
            role = ("--role", "segment", "--group", "0", "--groups", "1", "--segment", str(k),
                    "--segments", str(segments), "--frames", "4")  # fmt: skip
            procs.start(cid, role_cmd(mosquitto.url, cid, run_id, *role))
        metrics = finish(procs, devices, out)
    finally:
        tap.close()
    assert_equal_metrics(metrics, reference("fedsl", clients=1))
    assert metrics["fedsl"]["segments"] == segments and metrics["clients"] == 1
    assert metrics["comm"]["rejected_messages"] == 0 and metrics["comm"]["transport_dropped"] == 0
    # The hidden state went device -> aggregator -> device; no frame and no label crossed.
    seen: Counter[str] = Counter()
    for name, payload, _, _ in tap.snapshot():
        if not name.endswith(("/up", "/down")):
            continue
        msg = decode(payload)
        seen[f"{msg.type.value}@{name.rsplit('/', 2)[-2]}"] += 1
        assert "labels" not in msg.tensors, name
        for k, a in msg.tensors.items():
            assert a.ndim < 3 or k.startswith("w."), (name, k, a.shape)  # weights, or (B, hidden)
    assert seen["smashed@client-00-s0"] > 0 and seen["smashed@client-00-s1"] > 0, seen
    assert seen["gradients@client-00-s0"] > 0 and seen["gradients@client-00-s1"] == 0, seen


@pytest.mark.mqtt
@pytest.mark.slow
def test_pyvertical_owner_killed_and_restarted_mid_run_completes(
    mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    """An owner dies mid-round: that round ends (lock step needs every part); the owner comes
    back as a new process, PSI and alignment run again, and the later rounds train."""
    from .test_faults import is_smashed

    run_id, out, rounds = "deploy-pyvertical-restart", tmp_path / "out", 3
    owners = [f"owner-{i:02d}" for i in range(OWNERS)]
    cmds = {
        cid: role_cmd(
            mosquitto.url,
            cid,
            run_id,
            "--role",
            "owner",
            "--owner-index",
            str(i),
            "--owners",
            str(OWNERS),
        )  # fmt: skip
        for i, cid in enumerate(owners)
    }
    tap = Tap(mosquitto.url)
    try:
        procs.start("aggregator", serve_cmd(out, mosquitto.url, "pyvertical", OWNERS, rounds,
                                            run_id, "--synth-identities", str(IDENTITIES),
                                            "--round-timeout", "120"))  # fmt: skip
        for cid, cmd in cmds.items():
            procs.start(cid, cmd)
        victim = owners[1]
        assert tap.wait_for(is_smashed(victim, 0), 180, lambda: procs.check_alive("aggregator")), (
            procs.logs()
        )
        procs.kill(victim)
        procs.start(victim, cmds[victim])  # a new process: fresh head, no alignment
        metrics = finish(procs, owners, out)
    finally:
        tap.close()
    rows = metrics["rounds"]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert victim in rows[0]["dropped"] and rows[0]["clients"] == []
    assert all(r["clients"] == owners and not r["dropped"] for r in rows[1:]), rows
    assert "aligning the records again" in procs.log("aggregator")
    psi_queries = sum(
        1 for m in tap.snapshot() if m[0].endswith(f"/{victim}/down") and b"psi_request" in m[1]
    )
    assert psi_queries == 2, psi_queries  # once at the start, once after the restart


@pytest.mark.mqtt
@pytest.mark.slow
def test_fedsl_segment_killed_and_restarted_mid_run_completes(
    mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    """A segment device dies mid-round: its chain's round ends without it (every step needs the
    whole chain); it comes back as a new process, re-joins, and the later rounds train."""
    from .test_faults import is_smashed

    run_id, out, rounds, segments = "deploy-fedsl-restart", tmp_path / "out", 3, 2
    devices = [f"client-00-s{k}" for k in range(segments)]
    cmds = {
        cid: role_cmd(
            mosquitto.url,
            cid,
            run_id,
            "--role",
            "segment",
            "--group",
            "0",
            "--groups",
            "1",
            "--segment",
            str(k),
            "--segments",
            str(segments),
            "--frames",
            "4",
        )  # fmt: skip
        for k, cid in enumerate(devices)
    }
    tap = Tap(mosquitto.url)
    try:
        procs.start("aggregator", serve_cmd(out, mosquitto.url, "fedsl", segments, rounds,
                                            run_id, "--synth-identities", str(IDENTITIES),
                                            "--segments", str(segments), "--frames", "4",
                                            "--round-timeout", "120"))  # fmt: skip
        for cid, cmd in cmds.items():
            procs.start(cid, cmd)
        victim = devices[0]
        up = lambda: procs.check_alive("aggregator")  # noqa: E731
        assert tap.wait_for(is_smashed(victim, 0), 180, up), procs.logs()
        procs.kill(victim)
        procs.start(victim, cmds[victim])  # a new process: fresh segment, no round state
        metrics = finish(procs, devices, out)
    finally:
        tap.close()
    rows = metrics["rounds"]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert victim in rows[0]["dropped"], rows[0]
    assert all(sorted(r["clients"]) == devices and not r["dropped"] for r in rows[1:]), rows
