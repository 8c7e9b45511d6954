#!/usr/bin/env python
"""What sharing the batch (`TrainConfig.split_batch`) costs a deployment over MQTT.

With `--split-batch` (the default) each of K devices that train side by side steps on
batch / K pictures, so a round has K times as many smashed batches, each 1/K the size: the
activation bytes per picture stay about the same, but there are more messages and round trips
(SFLV2 serves them one at a time), and a device with more batches sits out fewer parts of a
round, so its half travels at more averages. This runs `aggregator serve` and K `edge-agent` processes over a
Mosquitto it starts on a free loopback port, for each algorithm and device count, once with
the whole batch and once shared, side by side in one invocation (this machine is shared, so
only the ratios of one run mean anything), and prints a markdown table. An algorithm named
`sflv2:ORDER` runs SFLV2 with that server schedule (`--sflv2-order`; plain `sflv2` runs the
product's default, lockstep).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_split_batch.py --clients 2,5 --rounds 3
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_split_batch.py --algos sflv2,sflv2:interleaved
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mqtt  # noqa: E402
from bench_mqtt import start_mosquitto, stop, train_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from splitfed.config import TrainConfig  # noqa: E402

MODES = {"whole": "--whole-batch", "shared": "--split-batch"}


def federate(url: str, work: Path, name: str, clients: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    algo, _, order = name.partition(":")
    extra = (MODES[mode], "--batch-size", str(args.batch_size),
             "--synth-identities", str(args.identities),
             *(("--sflv2-order", order) if order else ()))  # fmt: skip
    run = f"{algo}-{order or 'default'}-{clients}-{mode}"
    metrics, _ = bench_mqtt.federate(url, work, run, clients, args.rounds, args.identities,
                                     "fp32", algo=algo, extra=extra)  # fmt: skip
    return metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", default="sflv1,sflv2")
    ap.add_argument("--clients", default="2,5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--identities", type=int, default=24, help="synthetic people, all devices")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        broker, url = start_mosquitto(Path(tmp) / "broker")
        try:
            for algo in args.algos.split(","):
                for k in (int(c) for c in args.clients.split(",")):
                    work = Path(tmp) / algo.replace(":", "-")
                    runs = {m: federate(url, work / f"{k}{m}", algo, k, m, args)
                            for m in MODES}  # fmt: skip
                    rows.append((algo, k, runs))
                    print(f"{algo} x{k}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        finally:
            stop(broker)
    print(
        f"`aggregator serve` + K `edge-agent` processes over Mosquitto, synthetic set of "
        f"{args.identities} people, batch {args.batch_size}, {args.rounds} rounds, the "
        "product's defaults otherwise; seconds a round are the mean of rounds 2 and later.\n"
    )
    print("| algorithm | devices | batch a device, whole / shared | s/round, whole | s/round, "
          "shared | shared / whole | MQTT B/picture, whole | MQTT B/picture, shared |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for algo, k, runs in rows:
        secs = {m: np.mean([r["seconds"] for r in runs[m]["rounds"]][1:] or [np.nan]) for m in runs}
        shared = TrainConfig(batch_size=args.batch_size).device_batch(k)
        print(
            f"| {algo} | {k} | {args.batch_size} / {shared} | {secs['whole']:.2f} | "
            f"{secs['shared']:.2f} | {secs['shared'] / secs['whole']:.2f}x | "
            f"{train_bytes(runs['whole'])[2]:,.0f} | {train_bytes(runs['shared'])[2]:,.0f} |"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
