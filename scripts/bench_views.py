#!/usr/bin/env python
"""PyVertical on several cameras against one: the multi-view case, as a markdown table.

A SYNTHETIC proxy of KDEF's angles (`--views`): every synthetic picture is one moment, and each
"camera" sees it through its own flaw, as cameras at different angles and distances do:

    HL   blurred (out of focus)
    S    low resolution (far away)
    HR   sensor noise (poor light)

(perturbations of `splitfed.data.shift` at the given strength). Each camera is a data owner
holding its view's crops under record ids; the PSI aligns them and the multi-head SplitNN trains
with the labels at the aggregator (`simulate --algo pyvertical` on data with views, the same
path as `--views S,HL,HR` on KDEF). Single-view rows train one owner on one camera; the
multi-view row trains all three together. Same people, split and seed throughout.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_views.py --identities 40 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitfed.data.dataset import EmotionDataset
from splitfed.data.shift import shift_set
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.simulate import SimSpec, simulate

CAMERAS = {"HL": "blur", "S": "lowres", "HR": "noise"}


def multi_view(base: EmotionDataset, strength: float, seed: int) -> EmotionDataset:
    """The pictures of `base` seen by each camera, with KDEF's meta: angle, session, person."""
    assert base.subjects is not None
    n = len(base)
    # A record is one picture of `base`: its index within the person's pictures of an emotion
    # plays KDEF's session, so (session, person, emotion) names it uniquely.
    session = np.zeros(n, dtype=np.int64)
    seen: dict[tuple[str, int], int] = {}
    for i, (s, y) in enumerate(zip(base.subjects.tolist(), base.labels.tolist(), strict=True)):
        session[i] = seen.get((s, y), 0)
        seen[(s, y)] = session[i] + 1
    views = [
        shift_set(base.images, pert, seed + k, strength) for k, pert in enumerate(CAMERAS.values())
    ]
    return EmotionDataset(
        name=f"{base.name}-views",
        images=np.concatenate(views),
        labels=np.tile(base.labels, len(CAMERAS)),
        subjects=np.tile(base.subjects, len(CAMERAS)),
        meta={
            "angles": np.repeat(np.array(list(CAMERAS)), n),
            "sessions": np.tile(np.array([f"S{v}" for v in session]), len(CAMERAS)),
            "synthetic": True,
        },
    )


def run(data: EmotionDataset, views: list[str], rounds: int) -> dict[str, Any]:
    data.meta["views"] = views
    m = simulate(data, SimSpec("pyvertical", len(views), rounds, seed=0))
    return {
        "views": ",".join(views),
        "cameras": " + ".join(f"{v} ({CAMERAS[v]})" for v in views),
        "test_accuracy": m["final"]["test_accuracy"],
        "macro_f1": m["final"]["macro_f1"],
        "mb_per_round": m["comm"]["train_bytes_per_round"] / 1e6,
        "wall_seconds": m["wall_seconds"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--per-emotion", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--strength", type=float, default=1.0, help="strength of each camera's flaw")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/views"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = generate_synth(SynthConfig(identities=args.identities, per_emotion=args.per_emotion))
    data = multi_view(base, args.strength, seed=0)
    rows = []
    t0 = time.perf_counter()
    for views in ([v] for v in CAMERAS):
        rows.append(run(data, views, args.rounds))
        print(f"{rows[-1]['views']}: {rows[-1]['test_accuracy']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)  # fmt: skip
    rows.append(run(data, list(CAMERAS), args.rounds))
    best_single = max(r["test_accuracy"] for r in rows[:-1])
    lines = [
        f"Synthetic set of {args.identities} people x {args.per_emotion} pictures per emotion, "
        f"each seen by 3 cameras (flaw strength {args.strength}); subject split, seed 0, "
        f"{args.rounds} rounds, `simulate --algo pyvertical` with one owner per camera.",
        "",
        "| owners (cameras) | test accuracy | macro-F1 | MB on the wire / round |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['cameras']} | {100 * r['test_accuracy']:.1f} % | {r['macro_f1']:.3f} "
            f"| {r['mb_per_round']:.1f} |"
            for r in rows
        ),
        "",
        f"All three cameras against the best single one: "
        f"{100 * (rows[-1]['test_accuracy'] - best_single):+.1f} points.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
