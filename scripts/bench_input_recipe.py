#!/usr/bin/env python
"""The default input recipe against the old inputs, through the product's own `compare`.

For each seed, two `aggregator compare` runs on the same data and split: the defaults (per-crop
standardisation inside the client half, camera jitter at p 0.5) and the old inputs
(`--input-norm global --camera-jitter 0`). Every run also scores the domain-shift proxy. Writes a
markdown table of in-domain and shifted accuracy per algorithm and seed, with the means.

    python scripts/bench_input_recipe.py                        # the demo's size, seeds 0 and 1
    python scripts/bench_input_recipe.py --seeds 0 --rounds 4 --identities 12 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "old": (
        "global norm, no camera (old default)",
        ["--input-norm", "global", "--camera-jitter", "0"],
    ),
    "default": ("per-crop + camera 0.5 (default)", []),
}


def compare(
    out: Path, seed: int, extra: list[str], args: argparse.Namespace
) -> list[dict[str, str]]:
    cmd = [sys.executable, "-c", "from aggregator.cli import main; main()", "compare",
           "--algos", args.algos, "--clients", str(args.clients), "--rounds", str(args.rounds),
           "--synth-identities", str(args.identities), "--batch-size", str(args.batch_size),
           "--jobs", str(args.jobs), "--seed", str(seed), "--out", str(out), *extra]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO)
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def table(results: dict[tuple[str, int], list[dict[str, str]]], seeds: list[int]) -> list[str]:
    lines = [
        "| algo | recipe | in-domain, seeds " + " / ".join(map(str, seeds)) + " | mean "
        "| domain shift, seeds " + " / ".join(map(str, seeds)) + " | mean | gap (mean) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    algos = [r["algo"] for r in results[("default", seeds[0])]]
    for i, algo in enumerate(algos):
        for key, (name, _) in RECIPES.items():
            rows = [results[(key, s)][i] for s in seeds]
            ind = [float(r["test_accuracy"]) for r in rows]
            sh = [float(r["shift_accuracy"]) for r in rows]
            label = algo if rows[0]["clients"] == "1" else f"{algo} x{rows[0]['clients']}"
            lines.append(
                f"| {label} | {name} | {' / '.join(f'{x:.1%}' for x in ind)} | "
                f"{statistics.mean(ind):.1%} | {' / '.join(f'{x:.1%}' for x in sh)} | "
                f"{statistics.mean(sh):.1%} | {100 * (statistics.mean(ind) - statistics.mean(sh)):.1f} pts |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algos", default="centralized,sflv1,sflv2")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "input_recipe")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "input_recipe.md")
    args = ap.parse_args()
    t0 = time.time()
    results = {}
    for seed in args.seeds:
        for key, (_, extra) in RECIPES.items():
            results[(key, seed)] = compare(args.work / f"{key}-s{seed}", seed, extra, args)
    text = [
        "### The default input recipe against the old inputs (`scripts/bench_input_recipe.py`)",
        "",
        f"`aggregator compare --algos {args.algos} --clients {args.clients} --rounds {args.rounds} "
        f"--synth-identities {args.identities} --batch-size {args.batch_size} --jobs {args.jobs}`, "
        f"seeds {', '.join(map(str, args.seeds))}, with the defaults and with `--input-norm global "
        f"--camera-jitter 0`; SYNTHETIC eye regions, subject split; domain shift = the "
        f"`other_camera` proxy (`splitfed/data/shift.py`) on the same test people. "
        f"{time.time() - t0:.0f} s in all.",
        "",
        *table(results, args.seeds),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
