"""Benchmark of privacy: what the aggregator can rebuild from the wire under each defence.

Trains the undefended default (sflv1, 2 clients) on the synthetic set with a subject split,
then for every setting trains the same run with that defence and plays the honest-but-curious
aggregator against the held-out people (`splitfed.privacy.report.measure_setting`, the code of
`aggregator privacy-report`). Prints a markdown section for BENCHMARKS.md: test accuracy, SSIM
against its no-information baseline, PSNR, re-identification against chance and against the
originals, bytes per sample. Each row is also appended to OUT/rows.jsonl as soon as it is done.

Then it judges every setting against the targets of issue 11 (SSIM within 0.05 of the baseline,
re-identification at most 2x chance, at most 2 points of test accuracy below `none`), prints a
verdict line per setting and plots accuracy against leakage (OUT/privacy_tradeoff.png).
`--jobs N` measures N settings at a time, each in its own process with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from splitfed.config import TrainConfig
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.defences import DefenceConfig, get_defence
from splitfed.model import ModelConfig
from splitfed.privacy.attack import AttackConfig
from splitfed.privacy.report import attack_people, measure_setting, read_checkpoint
from splitfed.simulate import SimSpec, simulate

SETTINGS = (  # the likeliest candidates first, so a sweep stopped early has them
    "none,cut-4-noise-2-int8,cut-4-noise-1.5-int8,cut-4-noise-1-int8,cut-3-noise-1-int8,"
    "noise-1-int8,cut-3-bottleneck-8-noise-1-int8,noise-2,"
    "cut-3-bottleneck-8,nopeek-1-noise-1,bottleneck-8-noise-1-int8,cut-3-noise-2-int8,noise-1,"
    "cut-3,bottleneck-8,nopeek-1,int8,noise-0.5"
)

# Issue 11's targets for `recommended`.
MAX_SSIM_GAP = 0.05  # reconstructions' SSIM at most this far above the mean crop's
MAX_REID_RATIO = 2.0  # re-identification at most this many times chance
MAX_ACC_COST = 2.0  # points of test accuracy below no defence


def verdict(r: dict[str, Any], base_acc: float | None) -> dict[str, Any]:
    """The setting against the three targets: each measured value and whether it is met."""
    gap = r["ssim"] - r["ssim_baseline"]
    ratio = r["reid"] / r["reid_chance"]
    cost = None if base_acc is None else 100 * (base_acc - r["test_accuracy"])
    checks = {
        "ssim": gap <= MAX_SSIM_GAP,
        "reid": ratio <= MAX_REID_RATIO,
        "accuracy": cost is not None and cost <= MAX_ACC_COST,
    }
    return {
        "ssim_gap": gap,
        "reid_ratio": ratio,
        "acc_cost": cost,
        **checks,
        "all": all(checks.values()),
    }


def verdict_line(r: dict[str, Any], v: dict[str, Any]) -> str:
    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    cost = "n/a" if v["acc_cost"] is None else f"{v['acc_cost']:+.1f} pts"
    return (
        f"- `{r['name']}`: SSIM gap {v['ssim_gap']:+.3f} (<= {MAX_SSIM_GAP}: {mark(v['ssim'])}), "
        f"re-id {v['reid_ratio']:.2f}x chance (<= {MAX_REID_RATIO:g}x: {mark(v['reid'])}), "
        f"accuracy cost {cost} (<= {MAX_ACC_COST:g}: {mark(v['accuracy'])}) -> "
        + ("**meets all three**" if v["all"] else "does not meet all three")
    )


def frontier(rows: list[dict[str, Any]]) -> list[str]:
    """Settings no other setting beats on accuracy, SSIM gap and re-id ratio all at once."""

    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        return (-r["test_accuracy"], r["ssim"] - r["ssim_baseline"], r["reid"] / r["reid_chance"])

    def dominated(a: dict[str, Any]) -> bool:
        ka = key(a)
        return any(
            all(x <= y for x, y in zip(key(b), ka)) and key(b) != ka for b in rows if b is not a
        )

    return [r["name"] for r in rows if not dominated(r)]


def plot_tradeoff(rows: list[dict[str, Any]], base_acc: float | None, path: Path) -> None:
    """Test accuracy against the SSIM gap and against re-id / chance, one labelled point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    panels = [
        (
            "reconstruction SSIM minus the mean crop's",
            lambda r: r["ssim"] - r["ssim_baseline"],
            MAX_SSIM_GAP,
        ),
        ("re-identification / chance", lambda r: r["reid"] / r["reid_chance"], MAX_REID_RATIO),
    ]
    for ax, (label, fx, target) in zip(axes, panels):
        for r in rows:
            v = verdict(r, base_acc)
            x, y = fx(r), 100 * r["test_accuracy"]
            ax.scatter([x], [y], c="tab:green" if v["all"] else "tab:blue", s=24)
            ax.annotate(r["name"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axvline(target, color="tab:red", ls="--", lw=0.8, label=f"target <= {target:g}")
        if base_acc is not None:
            ax.axhline(
                100 * base_acc - MAX_ACC_COST,
                color="tab:orange",
                ls="--",
                lw=0.8,
                label=f"none - {MAX_ACC_COST:g} pts",
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle(
        "accuracy against leakage, every defence setting (SYNTHETIC eye regions; "
        "green: meets all three targets)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _synth(args: argparse.Namespace) -> Any:
    return generate_synth(SynthConfig(identities=args.identities, per_emotion=args.per_emotion))


def _attack(args: argparse.Namespace) -> AttackConfig:
    return AttackConfig(
        epochs=args.attack_epochs,
        width=args.attack_width,
        inversion_steps=args.inversion_steps,
        seed=args.seed,
    )


def _model(args: argparse.Namespace, shape: tuple[int, int, int]) -> ModelConfig:
    """The network of the base run: the defaults, or the input norm and blur asked for."""
    extra: dict[str, Any] = {} if args.input_norm is None else {"input_norm": args.input_norm}
    if args.antialias:
        extra["antialias"] = True
    return ModelConfig(input_shape=shape, **extra)


def _train(args: argparse.Namespace) -> TrainConfig:
    """Training of the base run (every setting trains as it did): defaults, or another camera p."""
    train = TrainConfig()
    return train if args.camera_jitter is None else train.with_camera(args.camera_jitter)


def _measure(args: argparse.Namespace, name: str, defence: DefenceConfig) -> dict[str, Any]:
    """One setting, in its own process under `--jobs`: the data is regenerated from its seed."""
    torch.set_num_threads(1)
    ds = _synth(args)
    run = read_checkpoint(args.out / "base")
    attack = _attack(args)
    people = attack_people(ds, args.seed, attack.val_fraction)
    t0 = time.perf_counter()
    row, _ = measure_setting(ds, run, name, defence, people, attack, args.out)
    row["seconds"] = time.perf_counter() - t0
    return row


def row_md(r: dict[str, Any], base_acc: float | None) -> str:
    acc = r["test_accuracy"]
    delta = "" if base_acc is None or acc is None else f" ({100 * (acc - base_acc):+.1f})"
    return (
        f"| {r['name']} | {acc:.1%}{delta} | {r['ssim']:.3f} | {r['ssim_baseline']:.3f} "
        f"| {r['ssim'] - r['ssim_baseline']:+.3f} | {r['psnr']:.1f} | {r['reid']:.0%} "
        f"| {r['reid_originals']:.0%} | {r['reid_chance']:.0%} | {r['bytes_per_sample']:.0f} "
        f"| {r['attack']} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--identities", type=int, default=36)
    ap.add_argument("--per-emotion", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--algo", default="sflv1")
    ap.add_argument("--settings", default=SETTINGS)
    ap.add_argument("--attack-epochs", type=int, default=60)
    ap.add_argument("--attack-width", type=int, default=16)
    ap.add_argument("--inversion-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--input-norm", choices=["global", "per-crop"], default=None, help="[the model's default]"
    )
    ap.add_argument(
        "--antialias",
        action="store_true",
        help="the anti-aliased network (ModelConfig.antialias) [off, the model's default]",
    )
    ap.add_argument(
        "--camera-jitter", type=float, default=None, help="camera jitter p [the default]"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench_privacy"))
    ap.add_argument("--section", type=Path, default=None, help="markdown file to write")
    ap.add_argument("--jobs", type=int, default=1, help="settings measured at a time")
    ap.add_argument(
        "--from-rows",
        action="store_true",
        help="measure nothing: report the rows already in OUT/rows.jsonl (e.g. of a sweep "
        "stopped early); settings without a row are listed as not measured",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    defences = {n: get_defence(n) for n in names}
    ds = _synth(args)
    attack = _attack(args)
    people = attack_people(ds, args.seed, attack.val_fraction)
    log = args.out / "rows.jsonl"
    if args.from_rows:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        have = {r["name"]: r for r in rows if r["name"] in defences}
        report(args, ds, people, [have[n] for n in defences if n in have], None)
        return
    started = time.perf_counter()
    base_dir = args.out / "base"
    simulate(
        ds,
        SimSpec(
            args.algo,
            2,
            args.rounds,
            args.seed,
            None,
            "subject",
            _model(args, ds.input_shape),
            _train(args),
            base_dir,
        ),
    )
    done: dict[str, dict[str, Any]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    log.write_text("")

    def record(row: dict[str, Any]) -> None:
        done[row["name"]] = row
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['name']}: {row_md(row, None)}  [{row['seconds']:.0f} s]", flush=True)

    if args.jobs <= 1:
        for name, defence in defences.items():
            record(_measure(args, name, defence))
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that ran torch
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_measure, args, n, d) for n, d in defences.items()]
            for fut in futures:
                record(fut.result())
    report(args, ds, people, [done[n] for n in defences], time.perf_counter() - started)


def report(
    args: argparse.Namespace,
    ds: Any,
    people: Any,
    rows: list[dict[str, Any]],
    seconds: float | None,
) -> None:
    """Table, verdicts and plot of the measured rows; the markdown goes to stdout and --section."""
    missing = [n for n in args.settings.split(",") if n and n not in {r["name"] for r in rows}]
    base_acc = next((r["test_accuracy"] for r in rows if r["name"] == "none"), None)
    verdicts = {r["name"]: verdict(r, base_acc) for r in rows}
    for r in rows:
        r["verdict"] = verdicts[r["name"]]
    meeting = [n for n, v in verdicts.items() if v["all"]]
    plot_tradeoff(rows, base_acc, args.out / "privacy_tradeoff.png")
    n_people = {
        k: len(set(getattr(people, k).subjects)) for k in ("aux_train", "aux_val", "victims")
    }
    lines = [
        "## Privacy: what the aggregator rebuilds from the wire (synthetic eye regions)",
        "",
        f"Produced by `scripts/bench_privacy.py --identities {args.identities} --per-emotion "
        f"{args.per_emotion} --rounds {args.rounds} --attack-epochs {args.attack_epochs} "
        f"--attack-width {args.attack_width} --inversion-steps {args.inversion_steps} "
        f"--jobs {args.jobs} --settings {args.settings} --seed {args.seed}"
        + (f" --input-norm {args.input_norm}" if args.input_norm else "")
        + (f" --camera-jitter {args.camera_jitter}" if args.camera_jitter is not None else "")
        + (" --antialias" if args.antialias else "")
        + "` on "
        f"{platform.machine()} (1 torch thread per job)"
        + ("" if seconds is None else f", {seconds:.0f} s in all")
        + ". "
        f"Data: SYNTHETIC eye regions ({len(ds)} pictures of {args.identities} synthetic "
        f"people), subject split. Each setting trains {args.algo} x2 for {args.rounds} rounds "
        "with its defence (the checkpoint itself for `none`). The attacker is the aggregator: it "
        f"holds the client half and trains a transposed-conv decoder on {n_people['aux_train']} "
        f"auxiliary people (early stopping on {n_people['aux_val']} more), fed with exactly what "
        f"the device sends under the setting, and attacks {n_people['victims']} people nobody "
        "trained on; the optimisation attack (gradient descent on the input through the known "
        "client half) also runs and the stronger is reported. Baseline = SSIM of the "
        "population's mean crop; re-id = nearest gallery photo (one other photo per victim) is "
        "the right person; `orig` = the same matcher on the originals.",
        "",
        "| setting | test acc (pts vs none) | SSIM | baseline | gap | PSNR dB | re-id | orig | "
        "chance | bytes/sample | stronger attack |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[row_md(r, base_acc) for r in rows],
        "",
        f"Targets (issue 11): SSIM gap <= {MAX_SSIM_GAP}, re-id <= {MAX_REID_RATIO:g}x chance, "
        f"accuracy at most {MAX_ACC_COST:g} points below `none` "
        f"({'n/a' if base_acc is None else f'{base_acc:.1%}'}).",
        "",
        *[verdict_line(r, verdicts[r["name"]]) for r in rows],
        "",
        "Settings meeting all three targets: "
        + (", ".join(f"`{n}`" for n in meeting) if meeting else "**none**")
        + ". Frontier (no setting better on accuracy, SSIM gap and re-id at once): "
        + ", ".join(f"`{n}`" for n in frontier(rows))
        + ". Plot: `privacy_tradeoff.png`."
        + ("" if not missing else f" Not measured (sweep stopped): {', '.join(missing)}."),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.section is not None:
        args.section.write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
