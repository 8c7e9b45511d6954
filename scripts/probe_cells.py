#!/usr/bin/env python
"""Cross-validated probes of single federated cells, as `scripts/bench_recipe.py` builds them.

The script that printed BENCHMARKS.md's "Sixteen averages a round" table and its probes: the
matrix's set (40 synthetic people x 3 pictures an emotion), recipe inputs (per-crop, camera
0.5), 20 epochs unless a cell says, 5 folds by person, two folds at a time through the
product's job pool.
Each cell is ALGO:CLIENTS:BATCH:SYNCS[:ORDER[:SERVER_LR]] (ORDER "-" keeps interleaving; a
SERVER_LR, a number, `auto` (the number of copies averaged) or `sqrt` (its square root), runs
`--server-opt sgd` at that lr), optionally followed by KEY=VALUE options: `partition=iid`
(devices holding pictures of everyone instead of their own people), `lr=` (the peak learning
rate), `warmup=` (rounds of warm-up, `TrainConfig.warmup_rounds`) and `geo=SCALE/DEGREES/SHIFT`
(geometric jitter of the training crops, `JitterConfig.scale`, `.rotation` and `.shift_y`),
`cam=` (the chance of each camera change, `CameraConfig.p`, 0.5 unless given),
`aa=1` (anti-aliased downsampling, `ModelConfig.antialias`), `server=momentum` or
`server=adam` (that server optimizer at SERVER_LR instead of plain SGD), `momentum=` (its
momentum, `AggregationConfig.server_momentum`) and `defence=` (a registered defence such as
`recommended`, or CUT/BOTTLENECK/NOISE/COMPRESSION such as `4/8/1/int8`, a `-` keeping the run's
own value; without it the cells run undefended), `rounds=` (epochs, 20 unless given) and
`recipe=` (one of `--recipe`'s named sets, as these options; each option given beside it
wins, so `recipe=other-cameras:aa=0` is that recipe without the blur).
BATCH is each device's batch; `split=1` makes it the batch the devices share
(`TrainConfig.split_batch`, each of K devices stepping on BATCH / K), for example

    OMP_NUM_THREADS=1 .venv/bin/python scripts/probe_cells.py \
        sflv1:2:16:16,sflv2:2:16:16:sequential,sflv1:10:16:16:-:1.5

`--seeds 0,1,2` repeats every cell with each seed (a seed draws its own folds, initial weights
and batch order; every cell of one seed tests the same people). After the cells it prints each
cell's paired difference from the FIRST cell (put centralized first): the mean over every
(seed, fold) run of the cell's accuracy minus the first cell's on the same test people, with
its standard error, for the test set and for the domain-shift proxy (`shift`), because on a few
hundred test pictures a fold's own noise is several points and only paired differences over
many runs can tell one point from zero. Each cell also prints its accuracy on every single
perturbation of the proxy (`splitfed.data.shift.PERTURBATIONS`), averaged over the folds, the
first round whose mean test accuracy reaches 95 % of its final (`bench_recipe.rounds_to`), and
at the end, for every cell, what test-time averaging (`splitfed.data.tta`) changes in domain and
on the proxy, paired with the same models without it. The table prints when every cell is done;
`--out DIR` also keeps each fold's metrics.json as the fold ends
(`DIR/seed-S-CELL/fold-I/metrics.json`), so a run cut short loses only its unfinished folds.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.jobs import run_tasks
from aggregator.options import RECIPES
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.data.tta import TTA_KEYS
from splitfed.defences import DefenceConfig, get_defence
from splitfed.model import ModelConfig
from splitfed.simulate import SimSpec

sys.path.insert(0, "scripts")
from bench_recipe import cell  # noqa: E402


def spec(text: str, model: ModelConfig, seed: int) -> tuple[SimSpec, str]:
    words = text.split(":")
    options = with_recipe(dict(w.split("=", 1) for w in words if "=" in w))
    known = {
        "partition", "lr", "warmup", "geo", "server", "momentum", "defence", "split", "aa",
        "rounds", "cam",
    }  # fmt: skip
    unknown = sorted(set(options) - known)
    if unknown:
        raise SystemExit(f"{text}: unknown option {unknown}")
    algo, clients, batch, syncs, *rest = [w for w in words if "=" not in w]
    order = {"sflv2_order": rest[0]} if rest and rest[0] != "-" else {}
    server: dict[str, object] = {}
    if len(rest) > 1:
        lr = AggregationConfig.parse_server_lr(rest[1])
        server = {"server_opt": options.get("server", "sgd"), "server_lr": lr}
        if "momentum" in options:
            server["server_momentum"] = float(options["momentum"])
    tuned: dict[str, object] = {}
    if "lr" in options:
        tuned["lr"] = float(options["lr"])
    if "warmup" in options:
        tuned["warmup_rounds"] = int(options["warmup"])
    split = options.get("split", "0") == "1"
    train = TrainConfig(
        batch_size=int(batch), syncs_per_round=int(syncs), split_batch=split, **order, **tuned
    )
    train = train.with_camera(float(options.get("cam", 0.5)))
    if "geo" in options:
        scale, rotation, shift_y = (float(v) for v in options["geo"].split("/"))
        train = train.with_geometry(scale=scale, rotation=rotation, shift_y=shift_y)
    if options.get("aa") == "1":
        model = model.model_copy(update={"antialias": True})
    return SimSpec(
        algo, int(clients), int(options.get("rounds", 20)), seed=seed, model=model, train=train,
        aggregation=AggregationConfig(**server), report_shift=True,
        partition=options.get("partition"), defence=defence(options.get("defence", "none")),
    ), f"{text} seed {seed}"  # fmt: skip


def with_recipe(options: dict[str, str]) -> dict[str, str]:
    """`recipe=NAME` (aggregator.options.RECIPES, `--recipe`) as this script's options; an
    option given beside it wins, as a flag does beside `--recipe` (`aa=0`: without the blur)."""
    name = options.pop("recipe", None)
    if name is None:
        return options
    if name not in RECIPES:
        raise SystemExit(f"recipe={name}: choose from {', '.join(RECIPES)}")
    r = RECIPES[name]
    expanded = {
        "aa": "1" if r["antialias"] else "0",
        "cam": f"{r['camera_jitter']:g}",
        "geo": f"{r['zoom_jitter']:g}/{r['roll_jitter']:g}/{r['offset_jitter']:g}",
        "rounds": str(r["rounds"]),
    }
    return {**expanded, **options}


def defence(text: str) -> DefenceConfig:
    """A registered defence by name, or CUT/BOTTLENECK/NOISE/COMPRESSION (`-`: the run's own)."""
    if "/" not in text:
        return get_defence(text)
    cut, bottleneck, noise, compression = (None if w == "-" else w for w in text.split("/"))
    return DefenceConfig(
        cut=cut, bottleneck=bottleneck, noise=noise or 0.0, compression=compression
    )


def by_perturbation(folds: list[dict[str, Any]]) -> str:
    """Accuracy on each single perturbation of the shift proxy, mean over the folds, in %."""
    names = folds[0]["final"]["shift_by_perturbation"]
    return " ".join(
        f"{n} {100 * np.mean([f['final']['shift_by_perturbation'][n] for f in folds]):.0f}"
        for n in names
    )


def paired(runs: dict[str, list[float]], reference: str, what: str = "test") -> str:
    """Each cell's mean accuracy difference from `reference` over the same runs, ± its SE."""
    ref = np.array(runs[reference])
    out = [f"{what}, paired against {reference} ({len(ref)} runs, points):"]
    for text, accs in runs.items():
        if text == reference:
            continue
        d = 100 * (np.array(accs) - ref)
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        out.append(
            f"  {text}: {100 * np.mean(accs):.1f} % against {100 * ref.mean():.1f} %, "
            f"difference {d.mean():+.1f} ± {se:.1f} (SE; spread of one run {d.std(ddof=1):.1f})"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", help="comma-separated ALGO:CLIENTS:BATCH:SYNCS[:ORDER[:SERVER_LR]]")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--curves", action="store_true", help="also print each fold's test accuracy per round"
    )
    ap.add_argument("--out", type=Path, help="keep each fold's metrics.json under this folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = generate_synth(SynthConfig(identities=40, per_emotion=3))
    model = ModelConfig(input_shape=data.input_shape, input_norm="per-crop")
    texts = args.cells.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = [(t, seed) for seed in seeds for t in texts]
    tasks = [spec(t, model, seed) for t, seed in cells]
    if args.out is not None:
        tasks = [
            (replace(s, out_dir=args.out / re.sub(r"[^\w=.-]", "_", f"seed-{seed}-{t}")), label)
            for (t, seed), (s, label) in zip(cells, tasks)
        ]
    runs: dict[str, list[float]] = {t: [] for t in texts}
    shifts: dict[str, list[float]] = {t: [] for t in texts}
    tta: dict[str, dict[str, list[float]]] = {t: {k: [] for k in TTA_KEYS} for t in texts}
    t0 = time.perf_counter()
    for (text, _), (_, label), m in zip(
        cells, tasks, run_tasks(data, tasks, 5, args.jobs, 1, False)
    ):
        r = cell(m)
        folds = [f["final"]["test_accuracy"] for f in m["folds"]]
        runs[text] += folds
        shifts[text] += [f["final"]["shift_accuracy"] for f in m["folds"]]
        shifted = [round(100 * f["final"]["shift_accuracy"], 1) for f in m["folds"]]
        print(
            f"{label}: test {100 * r['test_mean']:.1f} ± {100 * r['test_std']:.1f} % "
            f"shift {100 * r['shift']:.1f} % folds {[round(100 * f, 1) for f in folds]} "
            f"shift folds {shifted} rounds to 95 % {r['rounds_to_95']}",
            flush=True,
        )
        print(f"  by perturbation: {by_perturbation(m['folds'])}", flush=True)
        for k in TTA_KEYS:
            tta[text][k] += [f["final"][k] for f in m["folds"]]
        if args.curves:
            for i, f in enumerate(m["folds"]):
                curve = [round(100 * row["test_accuracy"]) for row in f["rounds"]]
                losses = [round(row["train_loss"], 2) for row in f["rounds"]]
                print(f"  fold {i}: test {curve} train loss {losses}", flush=True)
    if len(texts) > 1:
        print(paired(runs, texts[0]))
        print(paired(shifts, texts[0], "domain shift"))
    for text in texts:  # test-time averaging (splitfed.data.tta) against the same model without
        print(paired({"plain": runs[text], "tta": tta[text]["tta_in_domain_accuracy"]},
                     "plain", f"{text}, test-time averaging in domain"))  # fmt: skip
        print(paired({"plain": shifts[text], "tta": tta[text]["tta_shift_accuracy"]},
                     "plain", f"{text}, test-time averaging shifted"))  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
