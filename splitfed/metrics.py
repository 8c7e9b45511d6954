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


def plot_confusion(conf: np.ndarray, path: Path, title: str) -> None:
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5.2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right")
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
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
    fig.savefig(path, dpi=110)
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
