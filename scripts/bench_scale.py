#!/usr/bin/env python
"""Aggregator throughput with several workers: `serve --workers W` against N agents.

For every (agents, workers) pair, side by side in one run through one Mosquitto on a free
loopback port: `aggregator serve --algo sflv1 --workers W` and N agents as threads of this
process (one MQTT connection each, as scripts/bench_mqtt.py's many-agents section). Reported
from rank 0's metrics.json: the aggregator's training samples per second and the seconds of
the last round (the first one also pays for start-up), and the whole run's wall time.

    python scripts/bench_scale.py                                  # 10 and 50 agents, 1 and 2
    python scripts/bench_scale.py --agents 10,50,200 --workers 1,2,4
    python scripts/bench_scale.py --agents 4 --workers 1,2 --rounds 2 --out /tmp/scale.md

Writes runs/bench/scale.md (or --out). Agents in threads of one process share its GIL: with few
cores the agents, not the aggregator, can be the bottleneck; the table says how many cores ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from bench_mqtt import start_mosquitto, stop  # noqa: E402 - the same broker as bench_mqtt

SERVE = [sys.executable, "-c", "from aggregator.cli import main; main()", "serve"]


def run_pair(
    url: str, work: Path, agents: int, workers: int, rounds: int, identities: int
) -> dict[str, Any]:
    """One federation: serve --workers `workers` and `agents` agent threads; its numbers."""
    import torch

    from edge_agent.agent import Agent
    from splitfed.client import ClientRuntime
    from splitfed.data.partition import client_shards
    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.mqtt import LinkSettings

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    run_id = f"scale{agents}w{workers}"
    ds = generate_synth(SynthConfig(identities=identities))
    _, _, shards = client_shards(ds, agents, None, None, 0)
    cmd = [*SERVE, "--broker", url, "--algo", "sflv1", "--min-clients", str(agents),
           "--rounds", str(rounds), "--threads", "1", "--run-id", run_id,
           "--out", str(work / "out"), "--no-resume", "--join-timeout", "600",
           "--round-timeout", "1200", "--workers", str(workers)]  # fmt: skip
    log = (work / "serve.log").open("wb")
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    agg = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    settings = LinkSettings.from_url(url)
    pool = [
        Agent(
            ClientRuntime(f"client-{i:03d}", run_id, tr, te),
            settings,
            "splitfed",
            run_id,
            exit_when_done=True,
        )  # fmt: skip
        for i, (tr, te) in enumerate(shards)
    ]
    threads = []
    for a in pool:
        a.start()
        t = threading.Thread(target=a.run, daemon=True)
        t.start()
        threads.append(t)
    try:
        if agg.wait(3600) != 0:
            sys.exit(f"serve failed; see {work / 'serve.log'}")
    finally:
        stop(agg)
        log.close()
    wall = time.perf_counter() - t0
    for t in threads:
        t.join(30)
    for a in pool:
        a.close()
    m = json.loads((work / "out" / "metrics.json").read_text())
    last = m["rounds"][-1]
    return {
        "agents": agents,
        "workers": workers,
        "samples_per_s": last["samples"] / max(last["seconds"], 1e-9),
        "round_s": last["seconds"],
        "mean_round_s": sum(r["seconds"] for r in m["rounds"]) / len(m["rounds"]),
        "wall_s": wall,
        "test_accuracy": m["final"]["test_accuracy"],
        "rejected": m["comm"]["rejected_messages"],
    }


def table(rows: list[dict[str, Any]], rounds: int, identities: int) -> str:
    cores = os.cpu_count()
    lines = [
        "### Aggregator workers: SFLV1 training throughput (`scripts/bench_scale.py`)",
        "",
        f"{platform.processor() or platform.machine()}, {cores} cores, Python "
        f"{platform.python_version()}; Mosquitto on 127.0.0.1; synth with {identities} "
        f"identities; {rounds} rounds; agents as threads of one process; every worker and "
        "the agents with 1 torch thread. Samples/s and round time are of the last round.",
        "",
        "| agents | workers | samples/s | round s | mean round s | wall s | test acc | rejected |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['agents']} | {r['workers']} | {r['samples_per_s']:.0f} | {r['round_s']:.2f} | "
            f"{r['mean_round_s']:.2f} | {r['wall_s']:.1f} | {r['test_accuracy']:.3f} | "
            f"{r['rejected']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", default="10,50", help="comma-separated agent counts")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--identities", type=int, default=80, help="synth people (>= 1.25 x agents)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "scale.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        broker, url = start_mosquitto(Path(tmp) / "mosquitto")
        try:
            for n in (int(x) for x in args.agents.split(",")):
                for w in (int(x) for x in args.workers.split(",")):
                    r = run_pair(url, Path(tmp) / f"a{n}w{w}", n, w, args.rounds, args.identities)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
        finally:
            stop(broker)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = table(rows, args.rounds, args.identities)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
