"""K-fold cross-validation by person: `aggregator simulate --folds K` and `compare --folds K`.

One split by person leaves the test score at the mercy of which few people landed in the test
set (on 70 people, 14 test people, a handful of hard faces move it by several points). K folds
test every person exactly once, each fold a full run on the people of the other folds, and give
the spread that a single split hides. Folds are a split like any other (`fold:I/K`, see
`splitfed.data.dataset.fold_people`), so every algorithm, the vertical and clip ones included,
cuts the same people the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from splitfed.data.dataset import EmotionDataset, fold_split
from splitfed.data.tta import TTA_KEYS
from splitfed.errors import UserError
from splitfed.runner import write_outputs
from splitfed.simulate import SimSpec, simulate

CV_KEYS = ("test_accuracy", "macro_f1", "train_accuracy")


def summarize_folds(folds: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and (population) standard deviation over the folds of each final metric."""
    cv: dict[str, float] = {"folds": float(len(folds))}
    for key in CV_KEYS:
        vals = np.array([f["final"][key] for f in folds], dtype=np.float64)
        cv[f"{key}_mean"] = float(vals.mean())
        cv[f"{key}_std"] = float(vals.std())
    return cv


def combine_folds(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics dictionary for the K runs: their means, with every run kept under `folds`.

    `final` holds the means (so tables and plots read a cross-validated run like any other) and
    the summed test confusion, which counts every person once; `rounds` averages each round's
    row over the folds.
    """
    first = folds[0]
    cv = summarize_folds(folds)
    conf = np.sum([np.asarray(f["final"]["test_confusion"]) for f in folds], axis=0)
    n_rounds = min(len(f["rounds"]) for f in folds)
    rounds = [
        {
            key: float(np.mean([f["rounds"][r][key] for f in folds]))
            for key in first["rounds"][r]
            if isinstance(first["rounds"][r][key], int | float)
        }
        | {"round": first["rounds"][r]["round"]}
        for r in range(n_rounds)
    ]
    final: dict[str, Any] = {
        "train_accuracy": cv["train_accuracy_mean"],
        "test_accuracy": cv["test_accuracy_mean"],
        "macro_f1": cv["macro_f1_mean"],
        "test_confusion": conf.tolist(),
    }
    for key in ("in_domain_accuracy", "shift_accuracy", "shift_gap", *TTA_KEYS):
        if all(key in f["final"] for f in folds):
            final[key] = float(np.mean([f["final"][key] for f in folds]))
    data = dict(first["data"])
    data["split"] = f"subject, {len(folds)} folds"
    data["n_test"] = int(sum(f["data"].get("n_test", 0) for f in folds))
    return {
        "algo": first["algo"],
        "clients": first["clients"],
        "seed": first["seed"],
        "model": first["model"],
        "train": first["train"],
        "rounds": rounds,
        "final": final,
        "cv": cv,
        "folds": folds,
        "comm": {
            key: float(np.mean([f["comm"][key] for f in folds]))
            for key in first["comm"]
            if isinstance(first["comm"][key], int | float)
        },
        "wall_seconds": float(sum(f["wall_seconds"] for f in folds)),
        "train_seconds": float(sum(f["train_seconds"] for f in folds)),
        "train_samples": int(sum(f["train_samples"] for f in folds)),
        "data": data,
    }


def fold_specs(spec: SimSpec, folds: int) -> list[SimSpec]:
    """`spec` once per fold, fold i's people held out, each writing to `out_dir/fold-i`.

    The folds are independent runs (each seeded by the spec), so they may run one after
    another or side by side (`--jobs`) with the same numbers."""
    if folds < 2:
        raise UserError(f"--folds takes 2 or more, got {folds}")
    if spec.split not in (None, "subject"):
        raise UserError(
            f"--folds splits by person; it cannot be combined with --split {spec.split}"
        )
    return [
        replace(
            spec,
            split=fold_split(i, folds),  # type: ignore[arg-type]
            out_dir=spec.out_dir / f"fold-{i + 1}" if spec.out_dir is not None else None,
        )
        for i in range(folds)
    ]


def finish_folds(spec: SimSpec, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The folds' runs combined, and written to spec.out_dir."""
    metrics = combine_folds(runs)
    if spec.out_dir is not None:
        write_outputs(metrics, spec.out_dir)
    return metrics


def cross_validate(
    data: EmotionDataset,
    spec: SimSpec,
    folds: int,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run `spec` once per fold (fold i's people held out) and combine; written to spec.out_dir.

    Each fold's run goes to `out_dir/fold-i`; the combined metrics.json to `out_dir`.
    """
    runs = [simulate(data, sub, on_round) for sub in fold_specs(spec, folds)]
    return finish_folds(spec, runs)
