#!/usr/bin/env python
"""In-domain and domain-shift accuracy of the input recipes, side by side, as a markdown table.

Centralized training on the synthetic set with a subject split (test people never trained on),
the same seeds and epochs for every recipe:

    baseline   today's defaults: global pixel normalisation, flips and pixel shifts
    per-crop   + per-crop standardisation inside the client half (ModelConfig.input_norm)
    jitter     + geometric jitter of the band (TrainConfig.jitter)
    both       per-crop + jitter
    camera     + another camera's look (TrainConfig.jitter.camera): tone curve, side light,
               blur, lower resolution, sensor noise, JPEG
    per-crop+camera  per-crop + camera
    jitter+camera  jitter + camera
    all        per-crop + jitter + camera

The domain-shift proxy (splitfed/data/shift.py) is the test set as another camera and detector
would give it. The gap is in-domain minus shift accuracy; the last column is each recipe's gap
relative to the baseline's (the target is 50 % or less).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_shift.py --identities 70 --epochs 15
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitfed.config import CameraConfig, JitterConfig, TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.data.shift import PERTURBATIONS
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig
from splitfed.simulate import SimSpec, simulate

# Jitter as wide as detectors disagree: the proxy's band errors are 15 % offset, 25 % scale,
# 10 degrees; training covers most of that range.
OFF = JitterConfig(scale=0.0, rotation=0.0, shift_y=0.0, camera=CameraConfig(p=0.0))
DETECTOR_JITTER = OFF.model_copy(update={"scale": 0.2, "rotation": 8.0, "shift_y": 0.12})
# Each camera change on half the crops, up to about what another camera differs by.
CAMERA = CameraConfig(p=0.5, gamma=0.7, gradient=80.0, blur=1.4, lowres=3.0, noise=16.0, jpeg=20)
CAMERA_JITTER = OFF.model_copy(update={"camera": CAMERA})
DETECTOR_CAMERA_JITTER = DETECTOR_JITTER.model_copy(update={"camera": CAMERA})

RECIPES: dict[str, tuple[str, JitterConfig]] = {
    "baseline": ("global", OFF),
    "per-crop": ("per-crop", OFF),
    "jitter": ("global", DETECTOR_JITTER),
    "both": ("per-crop", DETECTOR_JITTER),
    "camera": ("global", CAMERA_JITTER),
    "per-crop+camera": ("per-crop", CAMERA_JITTER),
    "jitter+camera": ("global", DETECTOR_CAMERA_JITTER),
    "all": ("per-crop", DETECTOR_CAMERA_JITTER),
}


def train_and_measure(recipe: str, data: EmotionDataset, epochs: int, seed: int) -> dict[str, Any]:
    """Train one recipe centralized for `epochs` through `simulate`, measured on the proxy."""
    norm, jitter = RECIPES[recipe]
    model_cfg = ModelConfig(input_shape=data.input_shape, input_norm=norm)  # type: ignore[arg-type]
    spec = SimSpec(
        "centralized", 1, epochs, seed, split="subject", model=model_cfg,
        train=TrainConfig(jitter=jitter), report_shift=True,
    )  # fmt: skip
    m = simulate(data, spec)
    final = {k: v for k, v in m["final"].items() if k != "test_confusion"}
    return {"recipe": recipe, "seed": seed, "train_seconds": m["train_seconds"], **final}


def table(rows: list[dict[str, Any]]) -> str:
    """Mean (and range over seeds) per recipe, then accuracy per perturbation."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["recipe"], []).append(r)
    base_gap = float(np.mean([r["shift_gap"] for r in by.get("baseline", [])] or [np.nan]))

    def cell(vals: list[float]) -> str:
        if len(vals) == 1:
            return f"{100 * vals[0]:.1f} %"
        return f"{100 * np.mean(vals):.1f} % ({100 * min(vals):.1f}–{100 * max(vals):.1f})"

    out = [
        "| recipe | in-domain | domain shift | gap | gap vs baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rs in by.items():
        gap = float(np.mean([r["shift_gap"] for r in rs]))
        out.append(
            f"| {name} | {cell([r['in_domain_accuracy'] for r in rs])} "
            f"| {cell([r['shift_accuracy'] for r in rs])} | {100 * gap:.1f} pts "
            f"| {f'{gap / base_gap:.0%}' if base_gap > 0 else '-'} |"
        )
    out += ["", "| recipe | " + " | ".join(PERTURBATIONS) + " |"]
    out.append("|---|" + "---:|" * len(PERTURBATIONS))
    for name, rs in by.items():
        accs = [
            f"{100 * np.mean([r['shift_by_perturbation'][p] for r in rs]):.0f}"
            for p in PERTURBATIONS
        ]
        out.append(f"| {name} | " + " | ".join(accs) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--identities", type=int, default=70, help="synthetic people")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (split, init)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--json", type=Path, help="also write every run's numbers here")
    ap.add_argument(
        "--from-json", type=Path, nargs="+", help="train nothing: tabulate runs that --json wrote"
    )
    args = ap.parse_args(argv)
    if args.from_json:
        rows = [r for path in args.from_json for r in json.loads(path.read_text())]
        rows = [r for r in rows if r["recipe"] in args.recipes]
        rows.sort(key=lambda r: list(RECIPES).index(r["recipe"]))
        seeds = sorted({r["seed"] for r in rows})
        print(f"Seeds {' '.join(map(str, seeds))}; accuracy per perturbation in %.\n")
        print(table(rows))
        return 0
    torch.set_num_threads(1)
    data = generate_synth(SynthConfig(identities=args.identities, seed=args.data_seed))
    rows = []
    for seed in args.seeds:
        for recipe in args.recipes:
            r = train_and_measure(recipe, data, args.epochs, seed)
            print(
                f"{recipe:15s} seed {seed}: in-domain {r['in_domain_accuracy']:.3f} "
                f"shift {r['shift_accuracy']:.3f} ({r['train_seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            rows.append(r)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    print(
        f"Centralized, synth {args.identities} identities, subject split, {args.epochs} epochs, "
        f"seeds {' '.join(map(str, args.seeds))}; accuracy per perturbation in %.\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
