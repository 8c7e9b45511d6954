#!/usr/bin/env python
"""Cross-validated probes of single federated cells, as `scripts/bench_recipe.py` builds them.

The script that printed BENCHMARKS.md's "Sixteen averages a round" table and its probes: the
matrix's set (40 synthetic people x 3 pictures an emotion), recipe inputs (per-crop, camera
0.5), 20 epochs, seed 0, 5 folds by person, two cells at a time through the product's job pool.
Each cell is ALGO:CLIENTS:BATCH:SYNCS[:ORDER[:SERVER_LR]] (ORDER "-" keeps interleaving; a
SERVER_LR runs `--server-opt sgd` at that lr), for example

    OMP_NUM_THREADS=1 .venv/bin/python scripts/probe_cells.py \
        sflv1:2:16:16,sflv2:2:16:16:sequential,sflv1:10:16:16:-:1.5
"""

from __future__ import annotations

import sys
import time

import torch

from aggregator.jobs import run_tasks
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig
from splitfed.simulate import SimSpec

sys.path.insert(0, "scripts")
from bench_recipe import cell  # noqa: E402


def spec(text: str, model: ModelConfig) -> tuple[SimSpec, str]:
    algo, clients, batch, syncs, *rest = text.split(":")
    order = {"sflv2_order": rest[0]} if rest and rest[0] != "-" else {}
    server = {"server_opt": "sgd", "server_lr": float(rest[1])} if len(rest) > 1 else {}
    train = TrainConfig(batch_size=int(batch), syncs_per_round=int(syncs), **order)
    return SimSpec(
        algo, int(clients), 20, seed=0, model=model, train=train.with_camera(0.5),
        aggregation=AggregationConfig(**server), report_shift=True,
    ), text  # fmt: skip


def main() -> int:
    torch.set_num_threads(1)
    data = generate_synth(SynthConfig(identities=40, per_emotion=3))
    model = ModelConfig(input_shape=data.input_shape, input_norm="per-crop")
    texts = sys.argv[1].split(",")
    t0 = time.perf_counter()
    for text, m in zip(texts, run_tasks(data, [spec(t, model) for t in texts], 5, 2, 1, False)):
        r = cell(m)
        folds = [round(100 * f["final"]["test_accuracy"], 1) for f in m["folds"]]
        print(
            f"{text}: test {100 * r['test_mean']:.1f} ± {100 * r['test_std']:.1f} % "
            f"shift {100 * r['shift']:.1f} % folds {folds}",
            flush=True,
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
