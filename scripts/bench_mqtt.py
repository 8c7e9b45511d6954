#!/usr/bin/env python
"""Benchmark the MQTT federation; writes a markdown section to --out (for BENCHMARKS.md).

Measured, on this machine, with a Mosquitto it starts on a free loopback port:

1. wall time per round: `aggregator serve` + 4 `edge-agent` processes over Mosquitto against
   the in-process simulator for the same run (SFLV1, fp32), and their ratio;
2. MQTT payload bytes per training sample for fp32 / fp16 / int8 activations, each with its
   test accuracy (same runs, over Mosquitto);
3. p50 / p99 latency from an agent publishing smashed data to receiving its gradient;
4. 50 agents (separate MQTT connections, threads of one process) through one Mosquitto in one
   round, with every message accounted for;
5. the aggregator's training samples per second with 1, 10 and 50 agents;
6. PyVertical (2 `--role owner` agents) and FedSL (1 group x 2 `--role segment` agents):
   wall time per round over Mosquitto against the simulator, and bytes per training sample.

    python scripts/bench_mqtt.py --out bench-mqtt.md            # a few minutes
    python scripts/bench_mqtt.py --out bench-mqtt.md --quick    # smaller, for a smoke test
    python scripts/bench_mqtt.py --out bench-deployed.md --only deployed --quick   # 6 only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SERVE = [sys.executable, "-c", "from aggregator.cli import main; main()", "serve"]
AGENT = [sys.executable, "-m", "edge_agent"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(directory: Path, extra_conf: str = "") -> tuple[subprocess.Popen[bytes], str]:
    """Mosquitto on a free loopback port (config lines `extra_conf` added); (process, URL)."""
    binary = os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).is_file():
        sys.exit("mosquitto not found: run scripts/setup.sh (apt-get install mosquitto)")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    import pwd

    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nuser {pwd.getpwuid(os.getuid()).pw_name}\n"
        "allow_anonymous true\nset_tcp_nodelay true\n"
        "max_queued_messages 100000\nmax_inflight_messages 100\n"
        f"log_dest file {directory}/mosquitto.log\n" + extra_conf
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, f"mqtt://127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    sys.exit("mosquitto did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve(url: str, out: Path, run_id: str, clients: int, rounds: int, compression: str,
          log: Path, grad: str = "fp32", algo: str = "sflv1",
          extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:  # fmt: skip
    cmd = [*SERVE, "--broker", url, "--algo", algo, "--min-clients", str(clients), "--rounds",
           str(rounds), "--compression", compression, "--grad-compression", grad, "--threads", "1",
           "--run-id", run_id, "--out", str(out), "--no-resume", "--join-timeout", "600",
           "--round-timeout", "900", *extra]  # fmt: skip
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def agent_processes(url: str, run_id: str, n: int, identities: int, work: Path) -> list[Any]:
    procs = []
    for i in range(n):
        cmd = [*AGENT, "--broker", url, "--client-id", f"client-{i:02d}", "--dataset", "synth",
               "--synth-identities", str(identities), "--shard", f"{i}/{n}", "--threads", "1",
               "--run-id", run_id, "--exit-when-done",
               "--stats-file", str(work / f"agent{i}.json")]  # fmt: skip
        log = (work / f"agent{i}.log").open("wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return procs


def federate(
    url: str, work: Path, run_id: str, clients: int, rounds: int, identities: int,
    compression: str, grad: str = "fp32", algo: str = "sflv1", extra: tuple[str, ...] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """serve (`extra` flags added) + agent processes; (metrics, agent stats)."""
    work.mkdir(parents=True, exist_ok=True)
    agg = serve(url, work / "out", run_id, clients, rounds, compression, work / "serve.log", grad,
                algo=algo, extra=extra)  # fmt: skip
    agents = agent_processes(url, run_id, clients, identities, work)
    if agg.wait(3600) != 0:
        sys.exit(f"serve failed; see {work / 'serve.log'}")
    for p in agents:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            stop(p)
    stats = [json.loads((work / f"agent{i}.json").read_text()) for i in range(clients)]
    return json.loads((work / "out" / "metrics.json").read_text()), stats


def simulate_run(clients: int, rounds: int, identities: int, compression: str) -> dict[str, Any]:
    import torch

    from splitfed.config import TrainConfig
    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.simulate import SimSpec, simulate

    torch.set_num_threads(1)
    ds = generate_synth(SynthConfig(identities=identities))
    spec = SimSpec("sflv1", clients, rounds, seed=0, train=TrainConfig(compression=compression))
    return simulate(ds, spec)


def pool_run(url: str, work: Path, n: int, identities: int) -> tuple[dict[str, Any], list[Any]]:
    """One round with n agents as threads of this process (one MQTT connection each)."""
    import torch
    from agent_pool import AgentPool

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    run_id = f"pool{n}"
    agg = serve(url, work / "out", run_id, n, 1, "fp32", work / "serve.log")
    pool = AgentPool.synth(url, run_id, n, identities)
    pool.start()
    if agg.wait(3600) != 0:
        sys.exit(f"serve failed; see {work / 'serve.log'}")
    pool.finish()
    return json.loads((work / "out" / "metrics.json").read_text()), pool.agents


# PyVertical: 2 data owners; FedSL: 1 client group of 2 segment devices.
DEPLOYED = {
    **{a: (2, [("--shard", f"{i}/2") for i in range(2)]) for a in ("fedavg", "sl", "sflv1", "sflv2")},
    "pyvertical": (2, [("--role", "owner", "--owner-index", str(i), "--owners", "2")
                       for i in range(2)]),
    "fedsl": (1, [("--role", "segment", "--group", "0", "--groups", "1", "--segment", str(k),
                   "--segments", "2", "--frames", "4") for k in range(2)]),
}  # fmt: skip


def deployed_run(
    url: str, work: Path, algo: str, rounds: int, identities: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """serve + role agents over Mosquitto, and the simulator on the same run: (mqtt, sim)."""
    import torch

    from splitfed.config import TrainConfig
    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.simulate import SimSpec, simulate

    work.mkdir(parents=True, exist_ok=True)
    clients, roles = DEPLOYED[algo]
    run_id = f"bench-{algo}"
    extra = ("--synth-identities", str(identities))
    agg = serve(url, work / "out", run_id, len(roles), rounds, "fp32", work / "serve.log",
                algo=algo, extra=extra)  # fmt: skip
    agents = []
    for i, role in enumerate(roles):
        cmd = [*AGENT, "--broker", url, "--client-id", f"{algo[:5]}-{i:02d}", *role, "--dataset",
               "synth", "--synth-identities", str(identities), "--threads", "1", "--run-id",
               run_id, "--exit-when-done"]  # fmt: skip
        log = (work / f"agent{i}.log").open("wb")
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    if agg.wait(3600) != 0:
        sys.exit(f"serve --algo {algo} failed; see {work / 'serve.log'}")
    for p in agents:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            stop(p)
    mq = json.loads((work / "out" / "metrics.json").read_text())
    torch.set_num_threads(1)
    ds = generate_synth(SynthConfig(identities=identities))
    sim = simulate(ds, SimSpec(algo, clients, rounds, seed=0, train=TrainConfig()))
    return mq, sim


def deployed_lines(runs: dict[str, tuple[dict[str, Any], dict[str, Any]]], rounds: int,
                   identities: int) -> list[str]:  # fmt: skip
    lines = [
        "### Every deployable algorithm: MQTT vs simulator",
        "",
        "`aggregator serve --algo fedavg|sl|sflv1|sflv2` + 2 `edge-agent` processes (one shard "
        "each), `--algo pyvertical` + 2 `edge-agent --role owner` processes, and "
        f"`--algo fedsl` + 1 group x 2 `--role segment` processes (4 frames per clip), over "
        f"Mosquitto; synthetic set of {identities} people, batch 32, seed 0, {rounds} rounds, "
        "fp32. PyVertical's first round includes PSI and alignment. Bytes: MQTT payload bytes of "
        "the training traffic per training sample (FedSL: hidden states and their gradients "
        "relayed through the aggregator, and each segment's weights). Centralized has no "
        "network to measure.",
        "",
        "| algorithm | simulator s/round | MQTT s/round | MQTT s/round, rounds 2+ | ratio "
        "(rounds 2+) | MQTT B/sample | simulator B/sample | same train losses |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for algo, (mq, sim) in runs.items():
        mq_s = [r["seconds"] for r in mq["rounds"]]
        sim_s = [r["seconds"] for r in sim["rounds"]]
        same = [r["train_loss"] for r in mq["rounds"]] == [r["train_loss"] for r in sim["rounds"]]
        ratio = np.mean(mq_s[1:] or mq_s) / np.mean(sim_s[1:] or sim_s)
        lines.append(
            f"| {algo} | {np.mean(sim_s):.2f} | {np.mean(mq_s):.2f} | "
            f"{np.mean(mq_s[1:] or mq_s):.2f} | {ratio:.2f}x | {train_bytes(mq)[2]:,.0f} | "
            f"{train_bytes(sim)[2]:,.0f} | {'yes' if same else 'NO'} |"
        )
    return [*lines, ""]


def train_bytes(m: dict[str, Any]) -> tuple[float, float, float]:
    """(uplink, downlink, total) MQTT payload bytes per training sample, training traffic only."""
    up = sum(r["bytes_up"] for r in m["rounds"])
    down = sum(r["bytes_down"] for r in m["rounds"])
    n = sum(r["samples"] for r in m["rounds"])
    return up / n, down / n, (up + down) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of the compression runs")
    ap.add_argument("--identities", type=int, default=40, help="synthetic people (4-client runs)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument(
        "--only", choices=["all", "deployed"], default="all",
        help="deployed: only every deployable algorithm, MQTT vs simulator (section 6)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.identities = 2, 12
    if args.only == "deployed":
        work = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
        broker, url = start_mosquitto(work / "mosquitto")
        try:
            deployed = {}
            for algo in DEPLOYED:
                print(f"{algo} over Mosquitto and in the simulator ...", flush=True)
                deployed[algo] = deployed_run(url, work / algo, algo, args.rounds, args.identities)
        finally:
            stop(broker)
        text = "\n".join(deployed_lines(deployed, args.rounds, args.identities))
        args.out.write_text(text)
        print(text)
        shutil.rmtree(work, ignore_errors=True)
        return
    pool_identities = 64  # 50 subject-wise shards need at least 50 training people
    lines: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker, url = start_mosquitto(work / "mosquitto")
    started = time.time()
    try:
        # 1-3: four agent processes, fp32 / fp16 / int8 activations.
        runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for comp in ("fp32", "fp16", "int8"):
            print(f"4 agents over Mosquitto, {comp} ...", flush=True)
            runs[comp] = federate(
                url, work / comp, f"bench-{comp}", 4, args.rounds, args.identities, comp
            )
        print("4 agents, int8 activations + fp16 gradients ...", flush=True)
        runs["int8+fp16 grad"] = federate(url, work / "int8g", "bench-int8g", 4, args.rounds,
                                          args.identities, "int8", "fp16")  # fmt: skip
        print("in-process simulator, fp32 ...", flush=True)
        sim = simulate_run(4, args.rounds, args.identities, "fp32")
        pools: dict[int, tuple[dict[str, Any], list[Any]]] = {}
        for n in (1, 10, 50):
            print(f"{n} agents in one process, one round ...", flush=True)
            pools[n] = pool_run(url, work / f"pool{n}", n, pool_identities)
        deployed = {}
        for algo in DEPLOYED:
            print(f"{algo} over Mosquitto and in the simulator ...", flush=True)
            deployed[algo] = deployed_run(url, work / algo, algo, args.rounds, args.identities)
    finally:
        stop(broker)

    mq, stats = runs["fp32"]
    same = all(
        a["train_loss"] == b["train_loss"] for a, b in zip(mq["rounds"], sim["rounds"], strict=True)
    )
    if not same:
        print(
            "train losses, MQTT:",
            [r["train_loss"] for r in mq["rounds"]],
            "simulator:",
            [r["train_loss"] for r in sim["rounds"]],
            "dropped:",
            [r["dropped"] for r in mq["rounds"]],
        )
    mq_s = [r["seconds"] for r in mq["rounds"]]
    sim_s = [r["seconds"] for r in sim["rounds"]]
    ratio = np.mean(mq_s[1:] or mq_s) / np.mean(sim_s[1:] or sim_s)
    cpu = platform.processor() or platform.machine()
    lines += [
        "## MQTT federation (`aggregator serve` + `edge-agent` over Mosquitto)",
        "",
        f"Measured by `scripts/bench_mqtt.py` on {os.cpu_count()} CPU cores ({cpu}), Python "
        f"{platform.python_version()}, Mosquitto on 127.0.0.1, every process with 1 torch thread. "
        f"SFLV1, synthetic eye crops ({args.identities} people, subject-wise shards), batch 32, "
        f"seed 0, {args.rounds} rounds. Load average at the start: {os.getloadavg()[0]:.1f}.",
        "",
        "### Wall time per round: MQTT vs in-process simulator (4 clients, fp32)",
        "",
        "| run | mean s/round | mean s/round, rounds 2+ | min s/round | final test acc |",
        "|---|---:|---:|---:|---:|",
        f"| simulator (1 process) | {np.mean(sim_s):.2f} | {np.mean(sim_s[1:] or sim_s):.2f} | "
        f"{min(sim_s):.2f} | {sim['final']['test_accuracy']:.1%} |",
        f"| Mosquitto (serve + 4 agent processes) | {np.mean(mq_s):.2f} | "
        f"{np.mean(mq_s[1:] or mq_s):.2f} | {min(mq_s):.2f} | {mq['final']['test_accuracy']:.1%} |",
        "",
        f"Ratio MQTT / simulator: **{ratio:.2f}x** "
        f"(rounds 2+; round 1 includes each process's first torch calls), "
        f"{np.mean(mq_s) / np.mean(sim_s):.2f}x over all rounds; target <= 1.3x. Identical train "
        f"losses in every round: {'yes' if same else 'NO'}.",
        "",
        "### Bytes per training sample by activation compression (4 clients)",
        "",
        "MQTT payload bytes of the training traffic (round start, smashed data, gradients, client "
        "updates) divided by training samples; MQTT framing adds under 0.1 %.",
        "",
        "| activations | gradients | uplink B/sample | downlink B/sample | total B/sample | "
        "uplink vs fp32 | total vs fp32 | final test acc | acc vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_up, _, base_total = train_bytes(runs["fp32"][0])
    base_acc = runs["fp32"][0]["final"]["test_accuracy"]
    for name, (m, _) in runs.items():
        up, down, total = train_bytes(m)
        acc = m["final"]["test_accuracy"]
        comp, grad = (name.split("+")[0], "fp16") if "+" in name else (name, "fp32")
        lines.append(
            f"| {comp} | {grad} | {up:,.0f} | {down:,.0f} | {total:,.0f} | {base_up / up:.2f}x | "
            f"{base_total / total:.2f}x | {acc:.1%} | {100 * (acc - base_acc):+.1f} pt |"
        )
    lat = np.concatenate([np.asarray(s["grad_latencies_ms"]) for s in stats])
    lines += [
        "",
        "### Latency: smashed data published -> its gradient received (4 clients, fp32)",
        "",
        f"Over {len(lat)} batches: p50 **{np.percentile(lat, 50):.1f} ms**, p99 "
        f"**{np.percentile(lat, 99):.1f} ms** (includes the aggregator's server-half step).",
        "",
        "### Many agents: one round through one Mosquitto (agents as threads of one process)",
        "",
        "| agents | samples | round s | aggregator samples/s | completed | dropped | rejected | "
        "messages agents sent | messages aggregator got | gradients = smashed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, (m, agents) in pools.items():
        r = m["rounds"][0]
        sent = sum(a.counters["sent"] for a in agents)
        joins = sum(a.counters["joins"] for a in agents)
        leaves = sum(1 for a in agents if a.joined.is_set())  # LEAVE sent in close()
        grads_ok = all(len(a.grad_latency) == a.counters["sent_smashed"] for a in agents)
        lines.append(
            f"| {n} | {r['samples']} | {r['seconds']:.2f} | {r['samples'] / r['seconds']:.0f} | "
            f"{len(r['clients'])} | {len(r['dropped'])} | {m['comm']['rejected_messages']} | "
            f"{sent + joins} (+{leaves} leave) | {m['comm']['messages_up']} | "
            f"{'yes' if grads_ok else 'NO'} |"
        )
    lines += [
        "",
        *deployed_lines(deployed, args.rounds, args.identities),
        f"Synthetic set of {pool_identities} people for the many-agents runs; the aggregator counts every "
        "message it received before it wrote metrics.json (the agents' LEAVE messages come after). "
        f"Benchmark wall time: {time.time() - started:.0f} s.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
