"""Run metrics (`metrics.json`) and the plots a person opens afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from splitfed.emotions import EMOTIONS  # noqa: E402


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def plot_curves(metrics: dict[str, Any], path: Path) -> None:
    rounds = metrics["rounds"]
    r = [x["round"] for x in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(r, [x["train_accuracy"] for x in rounds], "o-", label="train (running)")
    ax1.plot(r, [x["test_accuracy"] for x in rounds], "s-", label="test")
    ax1.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title=f"{metrics['algo']} — accuracy")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(r, [x["train_loss"] for x in rounds], "o-", color="tab:red")
    ax2.set(xlabel="round", ylabel="cross-entropy", title="training loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(conf: np.ndarray, path: Path, title: str, mark_absent: bool = False) -> None:
    """Counts, shaded by recall; with `mark_absent`, classes with no pictures say so."""
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5.2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    rows = [
        f"{e} (none)" if mark_absent and conf[i].sum() == 0 else e for i, e in enumerate(EMOTIONS)
    ]
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right")
    ax.set_yticks(range(len(EMOTIONS)), rows)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(
                j,
                i,
                str(conf[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_comparison(results: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy per round, one panel per client count; centralized is the dashed reference.

    Identical curves (SFLV1 and FedAvg are equal by construction) are told apart by markers.
    """
    central = [m for m in results if m["algo"] == "centralized"]
    counts = sorted({m["clients"] for m in results if m["algo"] != "centralized"}) or [1]
    markers = dict(zip(sorted({m["algo"] for m in results}), "os^vDPX*"))
    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 4), squeeze=False)
    for ax, n in zip(axes[0], counts):
        for m in central:
            ax.plot(
                [x["round"] for x in m["rounds"]],
                [x["test_accuracy"] for x in m["rounds"]],
                "k--",
                lw=1.2,
                label="centralized",
            )
        for m in results:
            if m["clients"] != n or m["algo"] == "centralized":
                continue
            ax.plot(
                [x["round"] for x in m["rounds"]],
                [x["test_accuracy"] for x in m["rounds"]],
                marker=markers[m["algo"]],
                ms=5,
                mfc="none",
                label=m["algo"],
            )
        ax.set(title=f"{n} clients", xlabel="round", ylabel="test accuracy", ylim=(0, 1))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluation_report(conf: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class recall of a confusion matrix (rows true, columns predicted).

    A class with no picture in the data set has no recall: it is listed in `absent_classes` with
    `recall` null and left out of the macro-F1, rather than scored as 0 or 1. Pictures of
    present classes that were predicted as an absent class still count against their own class.
    """
    conf = np.asarray(conf, dtype=np.int64)
    support = conf.sum(1)
    predicted = conf.sum(0)
    tp = np.diag(conf)
    per_class: dict[str, dict[str, Any]] = {}
    f1s: list[float] = []
    for i, name in enumerate(EMOTIONS[: conf.shape[0]]):
        n, p = int(support[i]), int(predicted[i])
        recall = float(tp[i] / n) if n else None
        precision = float(tp[i] / p) if p else None
        f1: float | None = None
        if n:
            denom = 2 * tp[i] + (p - tp[i]) + (n - tp[i])
            f1 = float(2 * tp[i] / denom) if denom else 0.0
            f1s.append(f1)
        per_class[name] = {
            "n": n,
            "predicted": p,
            "recall": recall,
            "precision": precision,
            "f1": f1,
            "absent": n == 0,
        }
    total = int(conf.sum())
    return {
        "n": total,
        "accuracy": float(tp.sum() / total) if total else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_class": per_class,
        "absent_classes": [k for k, v in per_class.items() if v["absent"]],
        "confusion": conf.tolist(),
        "classes": list(EMOTIONS[: conf.shape[0]]),
    }
