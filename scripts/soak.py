#!/usr/bin/env python
"""A chaos soak of the MQTT federation, bounded in time, loopback only (issue 8, section 4).

`aggregator serve` and N `edge-agent` processes (synthetic data) train over a real Mosquitto on
127.0.0.1 while faults drawn from a seeded RNG hit them: agents `kill -9`ed and started again,
one broker restart, one aggregator `kill -9` followed by the same command (which resumes from
its checkpoint), and hostile publishers (tests/mqtt/hostile/, separate processes) sending
every class of hostile message for the whole run. A thread reads the aggregator's checkpoint
the whole time and counts every read that fails. Then the same run without faults, for the
accuracy to compare with. Each run is killed whole at its hard deadline (`--seconds`, exit
status 2).

    python scripts/soak.py                      # 8 agents, 4 rounds, each run at most 5 minutes
    python scripts/soak.py --quick              # 3 agents, 3 rounds: a smoke test

Writes `--out` (JSON) and a markdown section next to it (same name, .md) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from splitfed.checkpoint import load_model, load_state  # noqa: E402
from tests.mqtt.fed import (  # noqa: E402
    Mosquitto,
    Procs,
    agent_cmd,
    hostile_target,
    read_metrics,
    serve_cmd,
)
from tests.mqtt.hostile import CLASSES, write_spec  # noqa: E402

HOSTILE_CMD = [sys.executable, "-m", "tests.mqtt.hostile"]
PREFIX = "splitfed"
FAULT_KINDS = ("agent_kill", "broker_restart", "aggregator_kill")


@dataclass
class SoakConfig:
    """One soak: the federation, the faults to draw, and the time it may take."""

    agents: int = 8
    rounds: int = 4
    seconds: float = 300.0  # hard deadline of one run (faulty or clean)
    seed: int = 0
    algo: str = "sflv1"
    agent_kills: int = 4
    broker_restarts: int = 1
    aggregator_kills: int = 1
    hostile_count: int = 20  # messages per class in each publisher process
    hostile_group: int = 8  # classes per publisher process (they rotate through all of them)
    hostile_interval: float = 2.0  # seconds between publisher processes
    round_timeout: float = 90.0
    # Passes over local data per round: longer rounds give the resumed aggregator time to meet
    # the hostile publishers before the run ends (a short run on an idle machine is quick).
    local_epochs: int = 1


@dataclass(frozen=True)
class Fault:
    """A fault fires `delay` seconds after the run has completed `after_rounds` rounds."""

    kind: str
    after_rounds: int
    delay: float
    target: str = ""  # the agent, for agent_kill
    down: float = 0.0  # seconds the agent or broker stays down


def draw_faults(cfg: SoakConfig, rng: np.random.Generator) -> list[Fault]:
    """The schedule, from the seeded RNG: tied to round progress, since wall time is noisy.

    The aggregator is killed only once a checkpoint exists and before the last round ends;
    agents and the broker anywhere from the first round on.
    """
    last = max(cfg.rounds - 1, 0)
    faults = [
        Fault(
            "agent_kill",
            int(rng.integers(0, max(last, 1))),
            float(rng.uniform(0.5, 6.0)),
            f"client-{int(rng.integers(cfg.agents)):02d}",
            float(rng.uniform(1.0, 4.0)),
        )
        for _ in range(cfg.agent_kills)
    ]
    faults += [
        Fault(
            "broker_restart",
            int(rng.integers(0, max(last, 1))),
            float(rng.uniform(1.0, 5.0)),
            down=float(rng.uniform(0.5, 2.0)),
        )
        for _ in range(cfg.broker_restarts)
    ]
    faults += [
        # Soon after the checkpoint it waits for: a later kill could land after the last round,
        # when the agents have left and a resumed aggregator has no one to evaluate with.
        Fault("aggregator_kill", int(rng.integers(1, max(last, 1) + 1)), float(rng.uniform(0, 0.3)))
        for _ in range(cfg.aggregator_kills if cfg.rounds >= 2 else 0)
    ]
    return sorted(faults, key=lambda f: (f.after_rounds, f.delay))


def completed_rounds(checkpoint_dir: Path) -> int:
    """Rounds in the aggregator's checkpoint (0 before the first one is written)."""
    try:
        return int(json.loads((checkpoint_dir / "checkpoint.json").read_text())["round"]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class CheckpointWatch(threading.Thread):
    """Reads the checkpoint as `aggregator serve --resume` and `sfl-export` would, all run long.

    A read that raises is a failure: a checkpoint half written, or files that do not fit.
    """

    def __init__(self, directory: Path, period: float = 0.1) -> None:
        super().__init__(daemon=True, name="checkpoint-watch")
        self.dir = directory
        self.period = period
        self.stop = threading.Event()
        self.reads = 0
        self.absent = 0
        self.failures: list[str] = []

    def read_once(self) -> None:
        try:
            saved = load_state(self.dir)
            if saved is None:
                self.absent += 1
                return
            load_model(self.dir)
            self.reads += 1
        except Exception as e:  # noqa: BLE001 - any exception is what we count
            self.reads += 1
            if len(self.failures) < 50:
                self.failures.append(f"{type(e).__name__}: {e}"[:300])

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.read_once()
        self.read_once()

    def report(self) -> dict[str, Any]:
        return {
            "reads": self.reads,
            "failures": len(self.failures),
            "absent": self.absent,
            "errors": self.failures[:5],
        }


class BrokerWatch:
    """Mosquitto's own counters ($SYS, every second): the load the broker held.

    The counters restart with the broker; `totals` adds up every broker's last value.
    """

    SYS = {
        "$SYS/broker/messages/received": "messages_received",
        "$SYS/broker/messages/sent": "messages_sent",
        "$SYS/broker/bytes/received": "bytes_received",
        "$SYS/broker/bytes/sent": "bytes_sent",
        "$SYS/broker/clients/connected": "clients_connected",
    }

    def __init__(self, port: int, run_id: str) -> None:
        self.lock = threading.Lock()
        self.current: dict[str, int] = {}
        self.done: Counter[str] = Counter()  # what restarted brokers had counted
        self.peak_clients = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"soak-watch-{run_id}", protocol=mqtt.MQTTv311
        )
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe("$SYS/broker/#", 0)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        key = self.SYS.get(msg.topic)
        if key is None:
            return
        with contextlib.suppress(ValueError):
            value = int(bytes(msg.payload).split()[0])
            with self.lock:
                self.current[key] = value
                if key == "clients_connected":
                    self.peak_clients = max(self.peak_clients, value)

    def broker_restarting(self) -> None:
        """Bank this broker's counters before it goes (the next one starts at zero)."""
        with self.lock:
            for k, v in self.current.items():
                if k != "clients_connected":
                    self.done[k] += v
            self.current = {}

    def totals(self) -> dict[str, int]:
        with self.lock:
            out = Counter(self.done)
            for k, v in self.current.items():
                if k != "clients_connected":
                    out[k] += v
            return {**dict(out), "peak_clients_connected": self.peak_clients}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class HostileLoop(threading.Thread):
    """Hostile publisher processes, one after another for the whole run, rotating the classes.

    Each records when it ran, so that the check can tell which classes reached the aggregator
    that wrote metrics.json (the counts of a process killed with -9 are gone with it).
    """

    def __init__(self, cfg: SoakConfig, procs: Procs, broker: Mosquitto, spec: Path) -> None:
        super().__init__(daemon=True, name="hostile-loop")
        self.cfg = cfg
        self.procs = procs
        self.broker = broker
        self.spec = spec
        self.stop = threading.Event()
        self.names = list(CLASSES)
        self.runs: list[dict[str, Any]] = []  # {classes, sent, start, end, rc}

    def run(self) -> None:
        i = 0
        group = max(1, min(self.cfg.hostile_group, len(self.names)))
        while not self.stop.is_set():
            first = (i * group) % len(self.names)
            classes = [self.names[(first + j) % len(self.names)] for j in range(group)]
            report = self.procs.dir / f"hostile-{i}.json"
            name = f"hostile-{i}"
            t0 = time.monotonic()
            p = self.procs.start(
                name,
                [
                    *HOSTILE_CMD,
                    "--broker",
                    self.broker.url,
                    "--spec",
                    str(self.spec),
                    "--classes",
                    ",".join(classes),
                    "--count",
                    str(self.cfg.hostile_count),
                    "--seed",
                    str(self.cfg.seed * 1000 + i),
                    "--report",
                    str(report),
                ],
            )
            try:
                rc = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait(10)
            sent: dict[str, int] = {}
            if rc == 0 and report.exists():
                sent = json.loads(report.read_text())["sent"]
            self.runs.append(
                {"classes": classes, "sent": sent, "start": t0, "end": time.monotonic(), "rc": rc}
            )
            i += 1
            self.stop.wait(self.cfg.hostile_interval)

    def sent_by_class(
        self, since: float | None = None, until: float | None = None
    ) -> dict[str, int]:
        """Hostile messages the broker took, by class (only runs within `since`..`until`)."""
        out: Counter[str] = Counter()
        for r in self.runs:
            if (since is None or r["start"] >= since) and (until is None or r["end"] <= until):
                out.update(r["sent"])
        return dict(out)


@dataclass
class Federation:
    """The processes of one run, and what happened to them."""

    cfg: SoakConfig
    work: Path
    run_id: str
    broker: Mosquitto
    procs: Procs
    serve: list[str]
    agent_proc: dict[str, str] = field(default_factory=dict)  # client id -> current proc name
    killed: set[str] = field(default_factory=set)  # proc names killed on purpose
    aggregator: str = "aggregator"
    aggregator_started: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)

    @property
    def checkpoint_dir(self) -> Path:
        return self.work / "out" / "checkpoint"

    def start_agent(self, i: int) -> None:
        cid = f"client-{i:02d}"
        name = cid if cid not in self.agent_proc else f"{cid}-{len(self.events)}"
        stats = self.procs.dir / f"{name}.stats.json"
        self.procs.start(
            name,
            agent_cmd(self.broker.url, i, self.cfg.agents, self.run_id, "--stats-file", str(stats)),
        )
        self.agent_proc[cid] = name

    def start_aggregator(self, name: str) -> None:
        self.procs.start(name, self.serve)
        self.aggregator = name
        self.aggregator_started = time.monotonic()

    def note(self, t0: float, what: str, **kw: Any) -> None:
        self.events.append({"t": round(time.monotonic() - t0, 2), "event": what, **kw})

    def crashed(self) -> list[str]:
        """Processes that exited with an error and were not killed on purpose."""
        return [
            f"{n} (exit {p.returncode})"
            for n, p in list(self.procs.procs.items())
            if not n.startswith("hostile-")
            and n not in self.killed
            and p.poll() is not None
            and p.returncode != 0
        ]


def run_federation(
    cfg: SoakConfig, work: Path, faults: bool = True, run_id: str = "soak"
) -> dict[str, Any]:
    """One run over a fresh Mosquitto: with the drawn faults and hostile publishers, or clean.

    Returns what happened: completion, rounds, accuracy, faults by kind, hostile messages sent
    and rejected, checkpoint reads, broker load, processes that crashed. Never raises for a
    failed run: `ok` is False and `problems` says why.
    """
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    broker = Mosquitto(work / "mosquitto")
    with broker.conf.open("a") as f:
        f.write("sys_interval 1\n")  # $SYS counters every second: the load held
    broker.start()
    procs = Procs(logs)
    out = work / "out"
    serve = serve_cmd(
        out,
        broker.url,
        cfg.algo,
        cfg.agents,
        cfg.rounds,
        run_id,
        "--round-timeout",
        str(cfg.round_timeout),
        "--local-epochs",
        str(cfg.local_epochs),
    )
    fed = Federation(cfg, work, run_id, broker, procs, serve)
    rng = np.random.default_rng(cfg.seed)
    schedule = draw_faults(cfg, rng) if faults else []
    pending = list(schedule)
    restarts: list[tuple[float, int]] = []  # (when, agent index) of killed agents
    seen_round: dict[int, float] = {}  # completed rounds -> when first seen
    spec = work / "target.json"
    write_spec(spec, hostile_target(run_id, PREFIX))
    watch = CheckpointWatch(fed.checkpoint_dir)
    sysw = BrokerWatch(broker.port, run_id)
    hostile = HostileLoop(cfg, procs, broker, spec)
    problems: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + cfg.seconds
    status = "running"
    try:
        fed.start_aggregator("aggregator")
        for i in range(cfg.agents):
            fed.start_agent(i)
        watch.start()
        if faults:
            hostile.start()
        while status == "running":
            now = time.monotonic()
            if now > deadline:
                status = "deadline"
                problems.append(f"hard deadline of {cfg.seconds:.0f} s: everything killed")
                break
            done = completed_rounds(fed.checkpoint_dir)
            if done not in seen_round:
                seen_round[done] = now
                if done:
                    fed.note(t0, "round_done", round=done)
            agg = procs.procs[fed.aggregator]
            if agg.poll() is not None:
                status = "finished" if agg.returncode == 0 else "aggregator_failed"
                break
            for when, i in list(restarts):
                if now >= when:
                    restarts.remove((when, i))
                    fed.start_agent(i)
                    fed.note(t0, "agent_restart", agent=fed.agent_proc[f"client-{i:02d}"])
            for f in list(pending):
                since = min((t for r, t in seen_round.items() if r >= f.after_rounds), default=None)
                if since is None or now < since + f.delay:
                    continue
                pending.remove(f)
                fire(fed, f, restarts, t0)
            crashed = fed.crashed()
            if crashed:
                status = "crashed"
                problems.append(f"crashed: {crashed}")
                break
            time.sleep(0.1)
        if status == "finished":
            agents = [procs.procs[n] for n in fed.agent_proc.values()]
            for p in agents:  # --exit-when-done: they go once the aggregator says "stopped"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(1.0, min(30.0, deadline - time.monotonic())))
    finally:
        hostile.stop.set()
        watch.stop.set()
        if status == "deadline":
            for n, p in list(procs.procs.items()):
                if p.poll() is None:
                    fed.killed.add(n)
                    p.kill()
        if hostile.is_alive():
            hostile.join(70)
        watch.join(30)
        left = [n for n, p in list(procs.procs.items()) if p.poll() is None]
        procs.stop_all()
        sysw.close()
        broker.stop()
    wall = time.monotonic() - t0
    for f in pending:
        fed.note(t0, f"skipped_{f.kind}", after_rounds=f.after_rounds)
    crashed = fed.crashed()
    if crashed and status != "crashed":
        problems.append(f"crashed: {crashed}")
    metrics: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        metrics = read_metrics(out)
    if status == "finished" and not metrics:
        problems.append("the aggregator exited 0 without metrics.json")
    rounds_done = [r["round"] for r in metrics.get("rounds", [])]
    if status == "finished" and rounds_done != list(range(1, cfg.rounds + 1)):
        problems.append(f"rounds {rounds_done}, not 1..{cfg.rounds}")
    clients_by_round = [len(r["clients"]) for r in metrics.get("rounds", [])]
    if status == "finished" and 0 in clients_by_round:
        problems.append(f"a round trained no client: clients by round {clients_by_round}")
    ckpt = watch.report()
    if ckpt["failures"]:
        problems.append(f"{ckpt['failures']} checkpoint reads failed: {ckpt['errors']}")
    log_text = "\n".join(procs.log(n) for n in list(procs.procs) if not n.startswith("hostile-"))
    if "Traceback" in log_text:
        problems.append("a Traceback in the logs of the aggregator or an agent")
    comm = metrics.get("comm", {})
    result = {
        "ok": status == "finished" and not problems,
        "status": status,
        "problems": problems,
        "faulty": faults,
        "config": asdict(cfg),
        "wall_seconds": round(wall, 1),
        "rounds": rounds_done,
        "final_test_accuracy": metrics.get("final", {}).get("test_accuracy"),
        "test_accuracy_by_round": [r["test_accuracy"] for r in metrics.get("rounds", [])],
        "train_loss_by_round": [r["train_loss"] for r in metrics.get("rounds", [])],
        "clients_by_round": clients_by_round,
        "dropped_by_round": [r["dropped"] for r in metrics.get("rounds", [])],
        "schedule": [asdict(f) for f in schedule],
        "faults_survived": {k: fed.faults.get(k, 0) for k in FAULT_KINDS},
        "events": fed.events,
        "checkpoint": ckpt,
        "broker": sysw.totals(),
        "aggregator_messages_up": comm.get("messages_up"),
        "aggregator_messages_down": comm.get("messages_down"),
        "hostile_sent_by_class": hostile.sent_by_class(),
        # Sent after the aggregator that wrote metrics.json was started (its MQTT session is
        # persistent: what came while it started up waited for it) and before its last round
        # ended (so it has read them): its counts cover these.
        "hostile_sent_to_final_aggregator": hostile.sent_by_class(
            since=fed.aggregator_started, until=seen_round.get(cfg.rounds)
        ),
        "hostile_publishers": len(hostile.runs),
        "hostile_publishers_failed": sum(1 for r in hostile.runs if r["rc"] != 0),
        "rejected_by_reason": comm.get("rejected_by_reason", {}),
        "transport_dropped_by_reason": comm.get("transport_dropped_by_reason", {}),
        "crashed": fed.crashed(),
        "killed_on_purpose": sorted(fed.killed),
        "left_running_at_end": [n for n in left if not n.startswith("hostile-")],
        "logs": str(logs),
    }
    return result


def fire(fed: Federation, f: Fault, restarts: list[tuple[float, int]], t0: float) -> None:
    """Inflict one fault on the running federation."""
    procs = fed.procs
    if f.kind == "agent_kill":
        name = fed.agent_proc[f.target]
        if procs.procs[name].poll() is not None:
            fed.note(t0, "agent_kill_skipped", agent=name, why="not running")
            return
        fed.killed.add(name)
        procs.kill(name, signal.SIGKILL)
        restarts.append((time.monotonic() + f.down, int(f.target.split("-")[1])))
        fed.faults["agent_kill"] += 1
        fed.note(t0, "agent_kill", agent=name, down=round(f.down, 1))
    elif f.kind == "broker_restart":
        fed.note(t0, "broker_restart", down=round(f.down, 1))
        fed.broker.stop()
        time.sleep(f.down)
        fed.broker.start()
        fed.faults["broker_restart"] += 1
    elif f.kind == "aggregator_kill":
        name = fed.aggregator
        rounds = completed_rounds(fed.checkpoint_dir)
        if rounds >= fed.cfg.rounds:  # the run is over: nothing is left to resume
            fed.note(t0, "aggregator_kill_skipped", why="the last round is checkpointed")
            return
        fed.killed.add(name)
        procs.kill(name, signal.SIGKILL)
        fed.start_aggregator(f"aggregator-{fed.faults['aggregator_kill'] + 1}")
        fed.faults["aggregator_kill"] += 1
        fed.note(t0, "aggregator_kill", killed=name, checkpoint_rounds=rounds)


def hostile_check(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per hostile class sent to the final aggregator: its reasons' counts in metrics.json."""
    rejected = result["rejected_by_reason"]
    dropped = result["transport_dropped_by_reason"]
    out: dict[str, dict[str, Any]] = {}
    for name, sent in result["hostile_sent_to_final_aggregator"].items():
        cls = CLASSES.get(name)
        if cls is None or not sent:
            continue
        counts = rejected if cls.counted == "rejected" else dropped
        reasons = sorted(cls.reasons) if cls.reasons else ["any"]
        if not cls.reasons:  # random bytes: whatever reason, all of them together
            counts = {"any": sum(rejected.values())}
        out[name] = {
            "sent": sent,
            "reasons": reasons,
            "counted": int(sum(counts.get(r, 0) for r in reasons)),
        }
    return out


# ---- the report --------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _pcts(xs: list[float]) -> str:
    return ", ".join(f"{100 * x:.1f}" for x in xs) + " %"


def _floats(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def markdown(soak: dict[str, Any], clean: dict[str, Any] | None) -> str:
    cfg = soak["config"]
    b = soak["broker"]
    wall = max(soak["wall_seconds"], 1e-9)
    lines = [
        "## Chaos soak (issue 8)",
        "",
        f"Measured by `scripts/soak.py` on {platform.machine()}, {os.cpu_count()} cores: "
        f"`aggregator serve` ({cfg['algo']}, {cfg['rounds']} rounds) and {cfg['agents']} "
        "`edge-agent` processes (synthetic data) over one Mosquitto on 127.0.0.1, seed "
        f"{cfg['seed']}, faults drawn from that seed, hostile publishers (separate processes, "
        f"{cfg['hostile_count']} messages per class each) for the whole run. Result: "
        f"**{'passed' if soak['ok'] else 'FAILED'}** ({soak['status']}"
        + (f"; {'; '.join(soak['problems'])}" if soak["problems"] else "")
        + ").",
        "",
        "| | chaos run | clean run (same seed, no faults, no hostile traffic) |",
        "|---|---|---|",
        f"| rounds completed | {len(soak['rounds'])}/{cfg['rounds']} | "
        + (f"{len(clean['rounds'])}/{cfg['rounds']}" if clean else "not run")
        + " |",
        f"| final test accuracy | {_pct(soak['final_test_accuracy'])} | "
        + (_pct(clean["final_test_accuracy"]) if clean else "n/a")
        + " |",
        f"| wall time | {soak['wall_seconds']:.0f} s | "
        + (f"{clean['wall_seconds']:.0f} s" if clean else "n/a")
        + " |",
        f"| clients per round | {soak['clients_by_round']} | "
        + (str(clean["clients_by_round"]) if clean else "n/a")
        + " |",
        f"| test accuracy by round | {_pcts(soak['test_accuracy_by_round'])} | "
        + (_pcts(clean["test_accuracy_by_round"]) if clean else "n/a")
        + " |",
        f"| train loss by round | {_floats(soak['train_loss_by_round'])} | "
        + (_floats(clean["train_loss_by_round"]) if clean else "n/a")
        + " |",
        f"| messages through the broker (received / sent) | {b.get('messages_received', 0):,} / "
        f"{b.get('messages_sent', 0):,} ({b.get('messages_received', 0) / wall:.0f} / "
        f"{b.get('messages_sent', 0) / wall:.0f} per s) | "
        + (
            f"{clean['broker'].get('messages_received', 0):,} / "
            f"{clean['broker'].get('messages_sent', 0):,}"
            if clean
            else "n/a"
        )
        + " |",
        f"| bytes into the broker | {b.get('bytes_received', 0) / 1e6:.1f} MB "
        f"({b.get('bytes_received', 0) / wall / 1e6:.2f} MB/s) | "
        + (f"{clean['broker'].get('bytes_received', 0) / 1e6:.1f} MB" if clean else "n/a")
        + " |",
        f"| peak MQTT connections | {b.get('peak_clients_connected', 0)} | "
        + (str(clean["broker"].get("peak_clients_connected", 0)) if clean else "n/a")
        + " |",
        "",
        "Broker counts are Mosquitto's `$SYS` counters (every second, summed over the broker "
        "restart) and include the hostile traffic. A short synthetic run (12 synthetic people, "
        "4 rounds over 8 devices) does not get past chance accuracy (1/7 = 14.3 %; the in-process "
        "simulator gives the same for 8 clients and 4 rounds), so the train loss is the finer "
        "comparison of the two runs: the faults cost the rounds that lost devices a little.",
        "",
        "**Faults survived:** "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in soak["faults_survived"].items())
        + f"; processes that crashed: {len(soak['crashed'])}"
        + (f" ({', '.join(soak['crashed'])})" if soak["crashed"] else "")
        + ". Fault log: "
        + "; ".join(
            f"{e['t']:.0f} s {e['event'].replace('_', ' ')}"
            + (f" {e['agent']}" if "agent" in e else "")
            + (
                f" (checkpoint had {e['checkpoint_rounds']} rounds)"
                if "checkpoint_rounds" in e
                else ""
            )
            for e in soak["events"]
        )
        + ".",
        "",
        f"**Checkpoint:** read {soak['checkpoint']['reads']} times while the run went on "
        "(`load_state` and `load_model`, as a resume and `sfl-export` read it), "
        f"{soak['checkpoint']['failures']} failed.",
        "",
        f"**Hostile traffic:** {soak['hostile_publishers']} publisher processes "
        f"({soak['hostile_publishers_failed']} could not publish: the broker was down), "
        f"{sum(soak['hostile_sent_by_class'].values()):,} hostile messages taken by the broker. "
        "The aggregator killed with -9 takes its counts with it, so the rejections below are "
        "those of the aggregator that finished the run, against what was sent while it ran.",
        "",
        "| class | sent (whole run) | sent to the final aggregator | counted under | count |",
        "|---|---:|---:|---|---:|",
    ]
    checks = hostile_check(soak)
    for name in CLASSES:
        c = checks.get(name)
        lines.append(
            f"| {name} | {soak['hostile_sent_by_class'].get(name, 0)} | "
            + (f"{c['sent']} | {', '.join(c['reasons'])} | {c['counted']}" if c else "0 | | ")
            + " |"
        )
    sent_final = sum(soak["hostile_sent_to_final_aggregator"].values())
    refused = sum(soak["rejected_by_reason"].values()) + sum(
        soak["transport_dropped_by_reason"].values()
    )
    reasons = {
        **soak["rejected_by_reason"],
        **{f"transport: {k}": v for k, v in soak["transport_dropped_by_reason"].items()},
    }
    lines += [
        "",
        f"All together the final aggregator refused {refused:,} messages against {sent_final:,} "
        "hostile ones sent to it (it also got part of what publishers that began before the "
        "kill sent, and refuses its own agents' stale messages after the faults). "
        "A class's messages are built for round 0: "
        "once the run is past it, the round check refuses some of them first (as other_round), "
        "so a class's own reason can count fewer than were sent; `garbage`, `truncated` and "
        "`bitflip` (random bytes) may fall under any reason, the count is all reasons together.",
        "",
        "Rejected by reason (final aggregator's metrics.json): "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, help="edge-agent processes [8; --quick 3]")
    p.add_argument("--rounds", type=int, help="rounds [4; --quick 3]")
    p.add_argument(
        "--seconds",
        type=float,
        default=300.0,
        help="hard deadline of the chaos run, and again of the clean run (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="faults and run seed")
    p.add_argument("--out", type=Path, default=Path("runs/soak/soak.json"))
    p.add_argument("--quick", action="store_true", help="3 agents, 3 rounds, fewer faults")
    p.add_argument("--no-clean", action="store_true", help="skip the clean comparison run")
    p.add_argument("--work", type=Path, help="logs and run outputs [a temporary directory]")
    p.add_argument(
        "--report-only", action="store_true", help="only write the markdown again from --out"
    )
    a = p.parse_args(argv)
    if a.report_only:
        saved = json.loads(a.out.read_text())
        saved["hostile_check"] = hostile_check(saved["soak"])
        a.out.write_text(json.dumps(saved, indent=2))
        a.out.with_suffix(".md").write_text(markdown(saved["soak"], saved["clean"]))
        return 0
    cfg = SoakConfig(seed=a.seed)
    if a.quick:
        cfg.agents, cfg.rounds, cfg.agent_kills = 3, 3, 1
    cfg.agents = a.agents or cfg.agents
    cfg.rounds = a.rounds or cfg.rounds
    cfg.seconds = a.seconds
    work = a.work or Path(tempfile.mkdtemp(prefix="soak-"))
    soak = run_federation(cfg, work / "chaos", faults=True)
    print(
        json.dumps(
            {
                k: soak[k]
                for k in (
                    "ok",
                    "status",
                    "problems",
                    "wall_seconds",
                    "final_test_accuracy",
                    "faults_survived",
                    "checkpoint",
                )
            }
        )
    )
    clean = None
    if not a.no_clean:
        clean = run_federation(cfg, work / "clean", faults=False)
        print(
            json.dumps(
                {k: clean[k] for k in ("ok", "status", "wall_seconds", "final_test_accuracy")}
            )
        )
    report = {"soak": soak, "clean": clean, "hostile_check": hostile_check(soak)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    md = a.out.with_suffix(".md")
    md.write_text(markdown(soak, clean))
    print(f"wrote {a.out} and {md}; logs in {work}")
    if soak["status"] == "deadline" or (clean is not None and clean["status"] == "deadline"):
        return 2
    ok = soak["ok"] and (clean is None or clean["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
