#!/usr/bin/env python
"""What the client half's weights give away between two averages (`splitfed.privacy.updates`).

SFLV1 and SFLV2 send the aggregator each device's client half after every part of a round, so
`--syncs-per-round` sets how few pictures one change covers: a device with n batches a round
sends a change every n/syncs batches. This trains SFLV1 x2 under each defence (the product's
simulator, subject split, cached in --out), then, for each part size, lets the aggregator
invert one unseen device's changes: a decoder trained on parts the attacker plays on its own
auxiliary people, reading the change, the per-sample server gradients and the wire
activations; and the same decoder without the change. Their difference is what the weights
add to the activations. Data are SYNTHETIC eye regions.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_update_privacy.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from splitfed.checkpoint import load_model
from splitfed.config import TrainConfig
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.defences import get_defence
from splitfed.privacy.attack import AttackConfig, pixels
from splitfed.privacy.metrics import gallery_split, reidentify
from splitfed.privacy.report import attack_people
from splitfed.privacy.train import RunSetup, train_setting
from splitfed.privacy.updates import UpdateAttackConfig, measure_update_leakage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=36)
    ap.add_argument("--per-emotion", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--settings", default="none,cut-3-bottleneck-8-noise-1-int8")
    ap.add_argument("--parts", default="1x1,1x8,1x32,4x32", help="batches x batch size")
    ap.add_argument("--samples", type=int, default=2048, help="attacker's training crops")
    ap.add_argument("--victim-samples", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/update_privacy"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = generate_synth(
        SynthConfig(identities=args.identities, per_emotion=args.per_emotion, seed=args.seed)
    )
    people = attack_people(data, args.seed)
    victims = people.victims
    assert victims.subjects is not None
    gallery, queries = gallery_split(victims.subjects, args.seed)
    train = TrainConfig()
    cfg = UpdateAttackConfig(
        samples=args.samples,
        decoder=AttackConfig(
            inversion_steps=0, epochs=args.epochs, width=args.width, seed=args.seed
        ),
    )
    rows: list[dict[str, Any]] = []
    for name in args.settings.split(","):
        defence = get_defence(name)
        run_dir = args.out / name
        if not (run_dir / "checkpoint" / "model.safetensors").exists():
            setup = RunSetup("sflv1", 2, args.rounds, args.seed)
            train_setting(data, setup, defence, run_dir)
        _, client_net, server_net = load_model(run_dir / "checkpoint")
        wire = defence.wire_compression(train.compression)
        for shape in args.parts.split(","):
            batches, batch = (int(v) for v in shape.split("x"))
            leak = measure_update_leakage(
                client_net,
                server_net,
                (people.aux_train.images, people.aux_train.labels),
                (people.aux_val.images, people.aux_val.labels),
                (victims.images[queries], victims.labels[queries]),
                batch,
                batches,
                max(1, args.victim_samples // (batch * batches)),
                train,
                defence,
                wire,
                cfg,
            )
            q_people = victims.subjects[queries][leak.rows]
            g_people = victims.subjects[gallery]
            x_g = pixels(victims.images[gallery])
            row = {
                "setting": name,
                "batches": batches,
                "batch": batch,
                "ssim_update": leak.ssim_with_update,
                "ssim_activations": leak.ssim_activations_only,
                "ssim_baseline": leak.ssim_baseline,
                "reid_update": reidentify(leak.reconstructions, q_people, x_g, g_people),
                "reid_originals": reidentify(leak.crops, q_people, x_g, g_people),
                "reid_chance": 1.0 / len(gallery),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    md = [
        f"`scripts/bench_update_privacy.py --identities {args.identities} --per-emotion "
        f"{args.per_emotion} --rounds {args.rounds} --samples {args.samples} --epochs "
        f"{args.epochs} --width {args.width} --seed {args.seed}` on {platform.machine()}, "
        f"{time.perf_counter() - t0:.0f} s. SYNTHETIC eye regions, SFLV1 x2, subject split.",
        "",
        "| defence | part (batches x size) | SSIM with the change | activations only | "
        "mean crop | gain of the change | re-id | originals | chance |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['setting']} | {r['batches']} x {r['batch']} | {r['ssim_update']:.3f} "
            f"| {r['ssim_activations']:.3f} | {r['ssim_baseline']:.3f} "
            f"| {r['ssim_update'] - r['ssim_activations']:+.3f} | {100 * r['reid_update']:.0f} % "
            f"| {100 * r['reid_originals']:.0f} % | {100 * r['reid_chance']:.0f} % |"
        )
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, default=str, indent=2)
    )
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
