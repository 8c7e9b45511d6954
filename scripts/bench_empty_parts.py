#!/usr/bin/env python
"""Bytes a round when devices sit out the empty parts of a cut round, against every part.

With sixteen averages a round (the default) a device with fewer batches a round than parts has
empty parts. It sits them out (`Strategy.part_participants`): no ROUND_START, so its half does
not travel down and back unchanged. This script runs one round of each algorithm in the
product's simulator (the strategy code `aggregator serve` runs) on the set of BENCHMARKS.md's
"Sixteen averages a round" (40 synthetic people x 7 emotions x 3 pictures, subject split),
once as the product does it and once with `part_participants` returning every device (the
earlier behaviour), and prints a markdown table of megabytes down and up a round. The two runs'
numbers are also compared: they must be equal, and the script exits 1 if they are not.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_empty_parts.py --clients 2,5,10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from splitfed.algorithms.base import Strategy  # noqa: E402
from splitfed.config import TrainConfig  # noqa: E402
from splitfed.data.batches import num_batches  # noqa: E402
from splitfed.data.dataset import EmotionDataset  # noqa: E402
from splitfed.data.synth import SynthConfig, generate_synth  # noqa: E402
from splitfed.model import ModelConfig  # noqa: E402
from splitfed.simulate import SimSpec, simulate  # noqa: E402

# Whole batches: devices that share one (`split_batch`, the default since) each hold about K
# times as many, and at 16 parts none is left empty at these sizes.
TRAIN = TrainConfig(batch_size=16, split_batch=False)


def one_round(data: EmotionDataset, algo: str, clients: int, every_part: bool) -> dict:  # type: ignore[type-arg]
    spec = SimSpec(
        algo, clients, 1, seed=0, train=TRAIN,
        model=ModelConfig(input_shape=data.input_shape),
    )  # fmt: skip
    if not every_part:
        return simulate(data, spec)
    product = Strategy.part_participants
    Strategy.part_participants = lambda self, io, participants: participants  # type: ignore[method-assign]
    try:
        return simulate(data, spec)
    finally:
        Strategy.part_participants = product  # type: ignore[method-assign]


def numbers(m: dict) -> list:  # type: ignore[type-arg]
    """What training computed (not the wall times or bytes)."""
    keys = ("train_loss", "train_accuracy", "test_accuracy", "clients", "samples")
    rows = [[r.get(k) for k in keys] for r in m["rounds"]]
    return [*rows, m["final"]["test_accuracy"], m["final"]["test_confusion"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="2,5,10")
    ap.add_argument("--algos", default="sflv1,sflv2,fedavg")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = generate_synth(SynthConfig(identities=40, per_emotion=3))
    print(f"One round, {len(data)} synthetic pictures, batch {TRAIN.batch_size}, "
          f"{TRAIN.syncs_per_round} "
          "averages a round; MB = 10^6 bytes.\n")  # fmt: skip
    print("| algorithm | clients | batches a device | MB down, every part | MB down, "
          "sitting out | MB up, every part | MB up, sitting out | same numbers |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    t0, ok = time.perf_counter(), True
    for algo in args.algos.split(","):
        for k in (int(c) for c in args.clients.split(",")):
            every, product = one_round(data, algo, k, True), one_round(data, algo, k, False)
            same = numbers(every) == numbers(product)
            ok &= same
            a, b = every["comm"], product["comm"]
            batches = sorted(
                {num_batches(n, TRAIN.batch_size) for n in product["data"]["clients_samples"]}
            )
            print(f"| {algo} | {k} | {'-'.join(str(x) for x in batches)} | "
                  f"{a['bytes_down'] / 1e6:.2f} | {b['bytes_down'] / 1e6:.2f} | "
                  f"{a['bytes_up'] / 1e6:.2f} | {b['bytes_up'] / 1e6:.2f} | "
                  f"{'yes' if same else 'NO'} |", flush=True)  # fmt: skip
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
