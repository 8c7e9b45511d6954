"""Benchmark of the foundation: algorithms side by side on the synthetic set, one split.

Writes a markdown section (for BENCHMARKS.md) with: accuracy, macro-F1, wall time and bytes per
round for each algorithm and client count; SFLV1/SFLV2 against centralized at 2 clients; the
simulator's training throughput of SFLV1 relative to centralized, from the same run; and the
client half's size and compute per frame.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from splitfed.config import TrainConfig
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.metrics import plot_comparison
from splitfed.model import (
    ModelConfig,
    build_split_model,
    conv_macs,
    count_parameters,
    smashed_shape,
)
from splitfed.simulate import SimSpec, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clients", default="2,5,10")
    ap.add_argument("--algos", default="centralized,fedavg,sl,sflv1,sflv2,pyvertical,fedsl")
    ap.add_argument("--identities", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_core"))
    ap.add_argument("--section", type=Path, default=None, help="markdown file to write")
    ap.add_argument(
        "--reuse",
        type=Path,
        nargs="*",
        default=[],
        help="results.json of earlier runs of this script: their runs are reported, not rerun",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = generate_synth(SynthConfig(identities=args.identities))
    model = ModelConfig(input_shape=ds.input_shape)
    train = TrainConfig()
    algos = args.algos.split(",")
    counts = [int(c) for c in args.clients.split(",")]
    results = [m for f in args.reuse for m in json.loads(f.read_text())]
    done = {(m["algo"], m["clients"]) for m in results}
    for n in counts:
        for algo in algos:
            size = 1 if algo == "centralized" else n
            if algo == "centralized" and n != counts[0] or (algo, size) in done:
                continue
            t = time.perf_counter()
            spec = SimSpec(
                algo,
                n,
                args.rounds,
                args.seed,
                model=model,
                train=train,
                out_dir=args.out / f"{algo}-{n}",
            )
            m = simulate(ds, spec)
            print(
                f"{algo:12s} x{n:<3d} test {m['final']['test_accuracy']:.3f}  {time.perf_counter() - t:.0f} s",
                flush=True,
            )
            results.append(m)
    order = {a: i for i, a in enumerate(algos)}
    results.sort(
        key=lambda m: (m["clients"] if m["algo"] != "centralized" else 0, order.get(m["algo"], 99))
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results))
    plot_comparison(results, args.out / "comparison.png")

    client, server = build_split_model(model, 0)
    central = next((m for m in results if m["algo"] == "centralized"), results[0])
    lines = [
        "## Foundation: algorithms on the synthetic eye-region set",
        "",
        f"Produced by `scripts/bench_core.py --rounds {args.rounds} --clients {args.clients} --identities {args.identities}` "
        f"on {platform.machine()} ({torch.get_num_threads()} torch thread), one run after another{' (earlier runs reused: ' + ', '.join(str(f) for f in args.reuse) + ')' if args.reuse else ''}. Data: SYNTHETIC eye regions "
        f"({len(ds)} pictures, {args.identities} synthetic people), subject split: {central['data']['n_train']} train / "
        f"{central['data']['n_test']} test pictures of people never seen in training; clients hold whole people. "
        f"Every algorithm trains {args.rounds} epochs (rounds of one local epoch), Adam lr {train.lr}, batch {train.batch_size}.",
        "",
        "| algorithm | clients | train acc | test acc | macro-F1 | wall s | MB on the wire / round |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        f = m["final"]
        lines.append(
            f"| {m['algo']} | {m['clients']} | {f['train_accuracy']:.1%} | {f['test_accuracy']:.1%} | "
            f"{f['macro_f1']:.3f} | {m['wall_seconds']:.0f} | {m['comm']['train_bytes_per_round'] / 1e6:.1f} |"
        )
    lines.append("")
    for algo in ("sflv1", "sflv2"):
        m = next((m for m in results if m["algo"] == algo and m["clients"] == 2), None)
        if m is not None and central["algo"] == "centralized":
            gap = (m["final"]["test_accuracy"] - central["final"]["test_accuracy"]) * 100
            lines.append(
                f"- {algo.upper()} at 2 clients vs centralized, same epochs: test accuracy "
                f"{m['final']['test_accuracy']:.1%} vs {central['final']['test_accuracy']:.1%} ({gap:+.1f} points)."
            )
    s1 = next((m for m in results if m["algo"] == "sflv1" and m["clients"] == counts[0]), None)
    if s1 is not None and central["algo"] == "centralized":
        tp_c = central["train_samples"] / central["train_seconds"]
        tp_s = s1["train_samples"] / s1["train_seconds"]
        lines.append(
            f"- Simulator throughput, training samples/s: centralized {tp_c:.0f}, SFLV1 x{counts[0]} {tp_s:.0f} "
            f"(ratio SFLV1/centralized {tp_s / tp_c:.2f}). The runs ran one after the other on a shared "
            "machine whose load changed between them, so this ratio carries that noise."
        )
    macs = conv_macs(client, model.input_shape)
    lines += [
        f"- Client half (cut after block {model.cut}): {count_parameters(client):,} parameters, "
        f"{macs / 1e6:.1f} M multiply-accumulates ({2 * macs / 1e6:.1f} MFLOPs) per {model.input_shape[1]}x{model.input_shape[2]} frame; "
        f"smashed data {smashed_shape(model)} = {4 * torch.Size(smashed_shape(model)).numel() / 1024:.1f} KiB fp32 per frame. "
        f"Server half: {count_parameters(server):,} parameters.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.section:
        args.section.write_text(text)


if __name__ == "__main__":
    main()
