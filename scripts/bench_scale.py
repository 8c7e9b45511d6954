#!/usr/bin/env python
"""Aggregator throughput with several workers: `serve --workers W` against N agents.

For every (agents, workers) pair, side by side in one run through one Mosquitto on a free
loopback port: `aggregator serve --algo sflv1 --workers W` and N agents as threads of this
process (scripts/agent_pool.py, one MQTT connection each). Reported from rank 0's
metrics.json: the aggregator's training samples per second and the seconds of the last round
(the first one also pays for start-up), and the whole run's wall time; beside them, where the
CPU went (the aggregator's processes, the agents' process, Mosquitto) and the broker's own
message rates, read from its `$SYS` topics (published every second here).

    python scripts/bench_scale.py                                  # 10 and 50 agents, 1 and 2
    python scripts/bench_scale.py --agents 10,50,200 --workers 1,2,4
    python scripts/bench_scale.py --agents 10,50,200 --workers 1,2,4 --identities 1 \
        --per-emotion 2            # light agents: 1.25 people x 14 pictures each
    python scripts/bench_scale.py --agents 4 --workers 1,2 --rounds 2 --out /tmp/scale.md

Each cell uses max(--identities, 1.25 x agents) synthetic people (subject-wise shards need a
person per agent and some held out). Writes runs/bench/scale.md (or --out). Agents in threads
of one process share its GIL: with few cores the agents, not the aggregator, can be the
bottleneck; the table says how many cores ran and where the CPU seconds went.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from agent_pool import AgentPool  # noqa: E402
from bench_mqtt import start_mosquitto, stop  # noqa: E402 - the same broker as bench_mqtt

SERVE = [sys.executable, "-c", "from aggregator.cli import main; main()", "serve"]
SYS_TOPICS = {
    "$SYS/broker/messages/received": "msgs_in",
    "$SYS/broker/messages/sent": "msgs_out",
    "$SYS/broker/bytes/received": "bytes_in",
    "$SYS/broker/bytes/sent": "bytes_out",
}


class SysTap:
    """The broker's cumulative counters from `$SYS` (Mosquitto: every `sys_interval` s)."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        host, port = url.rsplit("/", 1)[-1].split(":")
        self.values: dict[str, int] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sys")
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 0) for t in SYS_TOPICS])
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.values[SYS_TOPICS[msg.topic]] = int(msg.payload)

    def read(self, settle: float = 1.5) -> dict[str, int]:
        """The counters as of now: wait for one more `$SYS` publication first."""
        time.sleep(settle)
        with self.lock:
            return dict(self.values)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _usage(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_pair(
    url: str, work: Path, agents: int, workers: int, rounds: int, identities: int,
    batch_size: int, per_emotion: int, broker_pid: int, tap: SysTap,
) -> dict[str, Any]:  # fmt: skip
    """One federation: serve --workers `workers` and `agents` agent threads; its numbers."""
    import torch

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    run_id = f"scale{agents}w{workers}"
    cmd = [*SERVE, "--broker", url, "--algo", "sflv1", "--min-clients", str(agents),
           "--rounds", str(rounds), "--threads", "1", "--run-id", run_id,
           "--out", str(work / "out"), "--no-resume", "--join-timeout", "900",
           "--round-timeout", "1200", "--workers", str(workers),
           "--batch-size", str(batch_size)]  # fmt: skip
    log = (work / "serve.log").open("wb")
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    sys0, broker0 = tap.read(0.0), cpu_seconds(broker_pid)
    agg0, self0 = _usage(resource.RUSAGE_CHILDREN), _usage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    agg = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    pool = AgentPool.synth(url, run_id, agents, identities, 3, per_emotion)
    pool.start()
    try:
        if agg.wait(3600) != 0:
            sys.exit(f"serve failed; see {work / 'serve.log'}")
    finally:
        stop(agg)
        log.close()
    wall = time.perf_counter() - t0
    agg_cpu = _usage(resource.RUSAGE_CHILDREN) - agg0
    pool.finish()
    agents_cpu = _usage(resource.RUSAGE_SELF) - self0
    broker_cpu = cpu_seconds(broker_pid) - broker0
    sys1 = tap.read()
    span = wall + 1.5  # the counters were read up to 1.5 s after the run
    m = json.loads((work / "out" / "metrics.json").read_text())
    last = m["rounds"][-1]
    rate = {k: (sys1.get(k, 0) - sys0.get(k, 0)) / span for k in SYS_TOPICS.values()}
    return {
        "agents": agents,
        "workers": workers,
        "identities": identities,
        "samples": last["samples"],
        "samples_per_s": last["samples"] / max(last["seconds"], 1e-9),
        "round_s": last["seconds"],
        "mean_round_s": sum(r["seconds"] for r in m["rounds"]) / len(m["rounds"]),
        "wall_s": wall,
        "cpu_aggregator_s": agg_cpu,
        "cpu_agents_s": agents_cpu,
        "cpu_broker_s": broker_cpu,
        "broker_msgs_in_per_s": rate["msgs_in"],
        "broker_msgs_out_per_s": rate["msgs_out"],
        "broker_mb_out_per_s": rate["bytes_out"] / 1e6,
        "test_accuracy": m["final"]["test_accuracy"],
        "completed": len(last["clients"]),
        "rejected": m["comm"]["rejected_messages"],
    }


def table(rows: list[dict[str, Any]], rounds: int, batch_size: int, per_emotion: int) -> str:
    cores = os.cpu_count()
    load = os.getloadavg()
    lines = [
        "### Aggregator workers: SFLV1 training throughput (`scripts/bench_scale.py`)",
        "",
        f"{platform.processor() or platform.machine()}, {cores} cores, Python "
        f"{platform.python_version()}; Mosquitto on 127.0.0.1; synth ({per_emotion} pictures per "
        "person and emotion), subject-wise shards; "
        f"{rounds} rounds, batch {batch_size}; agents as threads of one process; every worker "
        "and the agents with 1 torch thread. Samples/s and round time are of the last round; "
        "CPU seconds and broker rates over the whole cell (start-up, rounds, evaluation). "
        f"Load average at the end: {load[0]:.1f}.",
        "",
        "| agents | workers | people | samples/round | samples/s | round s | wall s | "
        "CPU s aggregator | CPU s agents | CPU s broker | broker msg/s in | broker msg/s out | "
        "broker MB/s out | completed | test acc | rejected |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['agents']} | {r['workers']} | {r['identities']} | {r['samples']} | "
            f"{r['samples_per_s']:.0f} | {r['round_s']:.2f} | {r['wall_s']:.1f} | "
            f"{r['cpu_aggregator_s']:.1f} | {r['cpu_agents_s']:.1f} | {r['cpu_broker_s']:.1f} | "
            f"{r['broker_msgs_in_per_s']:.0f} | {r['broker_msgs_out_per_s']:.0f} | "
            f"{r['broker_mb_out_per_s']:.1f} | {r['completed']} | {r['test_accuracy']:.3f} | "
            f"{r['rejected']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", default="10,50", help="comma-separated agent counts")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--identities", type=int, default=80, help="synth people, at least")
    ap.add_argument(
        "--per-emotion", type=int, default=6, help="synth pictures per person and emotion"
    )
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "scale.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        broker, url = start_mosquitto(Path(tmp) / "mosquitto", "sys_interval 1\n")
        tap = SysTap(url)
        try:
            for n in (int(x) for x in args.agents.split(",")):
                people = max(args.identities, math.ceil(1.25 * n))
                for w in (int(x) for x in args.workers.split(",")):
                    r = run_pair(url, Path(tmp) / f"a{n}w{w}", n, w, args.rounds, people,
                                 args.batch_size, args.per_emotion, broker.pid, tap)  # fmt: skip
                    print(json.dumps(r), flush=True)
                    rows.append(r)
        finally:
            tap.close()
            stop(broker)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = table(rows, args.rounds, args.batch_size, args.per_emotion)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
