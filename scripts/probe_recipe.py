#!/usr/bin/env python
"""Short probes of the federated recipe: one algorithm, one client count, one server optimizer,
the same epochs as centralized, on the synthetic set with a subject split.

Prints one line per round (test accuracy) and a last line with the final and best accuracy, so
that curves of several recipes can be compared side by side. SYNTHETIC data only.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/probe_recipe.py --algo sflv1 --clients 5 \
        --server-opt sgd --server-lr auto
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.simulate import SimSpec, simulate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", default="sflv1")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--per-emotion", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None, help="client peak lr [TrainConfig's]")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--schedule", default=None)
    ap.add_argument("--optimizer", default=None, help="client optimizer: adam or sgd")
    ap.add_argument("--momentum", type=float, default=None, help="client SGD momentum")
    ap.add_argument("--local-epochs", type=int, default=None)
    ap.add_argument("--server-opt", default=None)
    ap.add_argument("--server-lr", default=None, help="a number, auto or sqrt")
    ap.add_argument("--server-momentum", type=float, default=None)
    ap.add_argument("--sflv2-order", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the metrics summary here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = generate_synth(SynthConfig(identities=args.identities, per_emotion=args.per_emotion))
    train_kw = {
        k: v
        for k, v in {
            "lr": args.lr,
            "batch_size": args.batch_size,
            "schedule": args.schedule,
            "sflv2_order": args.sflv2_order,
            "optimizer": args.optimizer,
            "momentum": args.momentum,
            "local_epochs": args.local_epochs,
        }.items()
        if v is not None
    }
    agg_kw: dict[str, object] = {
        k: v
        for k, v in {"server_opt": args.server_opt, "server_momentum": args.server_momentum}.items()
        if v is not None
    }
    if args.server_lr is not None:
        agg_kw["server_lr"] = AggregationConfig.parse_server_lr(args.server_lr)
    spec = SimSpec(
        args.algo, args.clients, args.rounds, seed=args.seed,
        train=TrainConfig(**train_kw), aggregation=AggregationConfig(**agg_kw),  # type: ignore[arg-type]
    )  # fmt: skip
    t0 = time.perf_counter()
    m = simulate(data, spec, lambda row: print(
        f"round {row['round']}: test {100 * row['test_accuracy']:.1f} % "
        f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True))  # fmt: skip
    accs = [r["test_accuracy"] for r in m["rounds"]]
    label = " ".join(f"{k}={v}" for k, v in {**vars(args)}.items() if v is not None and k != "json")
    print("curve", " ".join(f"{100 * a:.1f}" for a in accs))
    final = m["final"]["test_accuracy"]
    print(
        f"RESULT {label}: final {100 * final:.1f} % best {100 * max(accs):.1f} % "
        f"train_loss {m['rounds'][-1]['train_loss']:.3f} ({time.perf_counter() - t0:.0f} s)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "curve": accs, "final": final}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
