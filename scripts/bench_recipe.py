#!/usr/bin/env python
"""Cross-validated accuracy of the split algorithms: from scratch against pretrained, before and
after the input recipe, in domain and on the domain-shift proxy, as a markdown table.

Every cell is `aggregator compare --folds K` (splitfed.crossval.cross_validate over the product's
simulator), so the numbers are those a user gets. The data are SYNTHETIC: a private population
(the federation's people) and, for pretraining, a larger public population drawn another way
(other people, a noisier camera, other resting faces), trained centrally first: the synthetic
proxy of "pretrain on a public set, fine-tune on the devices". Recipes (the inputs):

    old        global pixel normalisation, no camera jitter, one average a round, each
               device stepping on the whole batch (the defaults before the recipe)
    recipe     today's defaults: per-crop standardisation in the client half, camera jitter
               at chance 0.5 (ModelConfig.input_norm, CameraConfig.p), the devices' halves
               averaged TrainConfig.syncs_per_round times a round, and the batch shared by
               the devices that train side by side (TrainConfig.split_batch; `--whole-batch`
               gives each the whole batch, as the tables before it were measured)

The pretraining run uses the same recipe as the federated runs it starts. Cells run in parallel
through the product's own job pool (`compare --jobs`), which gives the numbers of one job.

"rounds to 95 %" is the first round whose cross-validated test accuracy reaches 95 % of the
final one.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_recipe.py --folds 5 --clients 2,5,10 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aggregator.jobs import run_tasks
from splitfed.config import SFLV2_ORDERS, AggregationConfig, TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig
from splitfed.simulate import SimSpec, simulate

# recipe -> (ModelConfig.input_norm, CameraConfig.p, TrainConfig.syncs_per_round, .split_batch)
RECIPES: dict[str, tuple[str, float, int, bool]] = {
    "old": ("global", 0.0, 1, False),
    "recipe": (
        "per-crop",
        0.5,
        TrainConfig.model_fields["syncs_per_round"].default,
        TrainConfig.model_fields["split_batch"].default,
    ),
}


def public_population(identities: int, per_emotion: int) -> EmotionDataset:
    """The pretraining set: other people and another camera than the federation's."""
    cfg = SynthConfig(
        identities=identities, per_emotion=per_emotion, seed=101, pixel_noise=14.0, resting=0.3
    )
    return generate_synth(cfg)


def pretrain(
    public: EmotionDataset, model: ModelConfig, train: TrainConfig, epochs: int, out: Path
) -> Path:
    """Centralized training on the public set; returns its checkpoint directory."""
    if not (out / "checkpoint" / "model.safetensors").exists():
        spec = SimSpec("centralized", 1, epochs, seed=0, model=model, train=train, out_dir=out)
        simulate(public, spec)
    return out / "checkpoint"


def rounds_to(m: dict[str, Any], share: float = 0.95) -> int:
    final = m["final"]["test_accuracy"]
    for row in m["rounds"]:
        if row["test_accuracy"] >= share * final:
            return int(row["round"])
    return len(m["rounds"])


def cell(m: dict[str, Any]) -> dict[str, Any]:
    cv, f = m["cv"], m["final"]
    return {
        "test_mean": cv["test_accuracy_mean"],
        "test_std": cv["test_accuracy_std"],
        "f1_mean": cv["macro_f1_mean"],
        "shift": f.get("shift_accuracy"),
        "rounds_to_95": rounds_to(m),
        "wall_seconds": m["wall_seconds"],
    }


def table(rows: list[dict[str, Any]], folds: int) -> str:
    out = [
        f"| recipe | start | algorithm | clients | test ({folds}-fold, mean ± std) | macro-F1 "
        "| domain shift | rounds to 95 % |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shift = f"{100 * r['shift']:.1f} %" if r["shift"] is not None else "-"
        out.append(
            f"| {r['recipe']} | {r['start']} | {r['algo']} | {r['clients']} "
            f"| {100 * r['test_mean']:.1f} ± {100 * r['test_std']:.1f} % | {r['f1_mean']:.3f} "
            f"| {shift} | {r['rounds_to_95']} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=40, help="people in the private set")
    ap.add_argument("--per-emotion", type=int, default=3, help="840 pictures at 40 people")
    ap.add_argument("--public-identities", type=int, default=120)
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--clients", default="2,5,10")
    ap.add_argument("--algos", default="centralized,sl,sflv1,sflv2")
    ap.add_argument("--recipes", default="old,recipe")
    ap.add_argument("--starts", default="scratch,pretrained")
    ap.add_argument("--old-clients", default=None, help="client counts for the old recipe [all]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--syncs", type=int, default=None, help="averages a round [the recipe's]")
    ap.add_argument(
        "--sflv2-order",
        choices=SFLV2_ORDERS,
        default=TrainConfig.model_fields["sflv2_order"].default,
        help="SFLV2's server schedule [the product's default]",
    )
    ap.add_argument("--server-opt", default="none", help="none, sgd, momentum or adam")
    ap.add_argument(
        "--server-lr", default=None, help="a number, auto (the client count) or sqrt (its root)"
    )
    ap.add_argument(
        "--whole-batch", action="store_true", help="each device steps on the whole batch"
    )
    ap.add_argument(
        "--antialias",
        action="store_true",
        help="the anti-aliased network, pretraining included (ModelConfig.antialias) [off]",
    )
    ap.add_argument(
        "--jobs", type=int, default=1, help="runs (a cell's folds) at once, one process each"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/recipe"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = generate_synth(SynthConfig(identities=args.identities, per_emotion=args.per_emotion))
    public = public_population(args.public_identities, args.per_emotion)
    algos = args.algos.split(",")
    server_lr = (
        None if args.server_lr is None else AggregationConfig.parse_server_lr(args.server_lr)
    )
    aggregation = AggregationConfig(server_opt=args.server_opt, server_lr=server_lr)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for recipe in args.recipes.split(","):
        norm, camera, syncs, split = RECIPES[recipe]
        model = ModelConfig(
            input_shape=data.input_shape,
            input_norm=norm,  # type: ignore[arg-type]
            antialias=args.antialias,
        )
        train = TrainConfig(
            batch_size=args.batch_size,
            syncs_per_round=args.syncs or syncs,
            sflv2_order=args.sflv2_order,
            split_batch=split and not args.whole_batch,
        ).with_camera(camera)
        clients = args.old_clients if recipe == "old" and args.old_clients else args.clients
        counts = [int(c) for c in clients.split(",")]
        for start in args.starts.split(","):
            init = None
            if start == "pretrained":
                out = args.out / f"public-{recipe}"
                init = pretrain(public, model, train, args.pretrain_epochs, out)
            cells = [(a, n) for a in algos for n in (counts if a != "centralized" else [1])]
            tasks = [
                (SimSpec(
                    a, n, args.rounds, seed=0, model=model, train=train, aggregation=aggregation,
                    report_shift=True, init_from=init,
                ), f"{recipe} {start} {a} x{n}")
                for a, n in cells
            ]  # fmt: skip
            for (a, n), m in zip(cells, run_tasks(data, tasks, args.folds, args.jobs, 1, False)):
                row = {"recipe": recipe, "start": start, "algo": a, "clients": n, **cell(m)}
                rows.append(row)
            print(f"{recipe} {start}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, default=str, indent=2)
    )
    md = table(rows, args.folds)
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
