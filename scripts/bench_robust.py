#!/usr/bin/env python
"""One malicious device against the aggregation rules: final accuracy, as a markdown table.

The in-process federation (`splitfed.simulate`, the same strategy code `aggregator serve` runs)
with the synthetic set, once clean and once with one device poisoning its client update
(`tests.adversaries.PoisonRuntime`: global + scale x its honest update; -100 flips and blows it
up, -1 only flips it, +100 overshoots). Each aggregation rule runs clean and attacked; the
target is that the robust rule under attack stays within 3 points of the clean plain mean,
which the plain mean under attack does not. The honest update norms of the clean mean run are
reported too: `--clip-update-norm` is an absolute L2 bound, so it is chosen from them.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_robust.py     # about 12 min on one core
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_robust.py --rule median --rule mean@2

A rule is `METHOD[:TRIM][@CLIP]`: `trimmed-mean:0.2@2.5` (the default) is --aggregation
trimmed-mean --trim-ratio 0.2 --clip-update-norm 2.5. Defaults: sflv1, 5 clients, 12 rounds,
40 synthetic people, attack scales -100, +100 and -1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests.adversaries: the attacker lives with the test doubles
    sys.path.insert(0, str(REPO))

from splitfed.client import ClientRuntime  # noqa: E402
from splitfed.config import AggregationConfig, TrainConfig  # noqa: E402
from splitfed.data.dataset import EmotionDataset  # noqa: E402
from splitfed.data.synth import SynthConfig, generate_synth  # noqa: E402
from splitfed.simulate import SimSpec, client_id, simulate  # noqa: E402
from tests.adversaries import NormProbeRuntime, PoisonRuntime  # noqa: E402

MARGIN = 0.03  # "within 3 points of a clean run"


def parse_rule(rule: str) -> AggregationConfig:
    """`METHOD[:TRIM][@CLIP]` -> the aggregation config `aggregator serve` flags would give."""
    head, _, clip = rule.partition("@")
    method, _, trim = head.partition(":")
    return AggregationConfig(
        method=method,  # type: ignore[arg-type]
        trim_ratio=float(trim) if trim else 0.2,
        clip_update_norm=float(clip) if clip else None,
    )


def serve_flags(agg: AggregationConfig) -> list[str]:
    """The same rule as `aggregator serve` flags (for the table and the MQTT test)."""
    flags = ["--aggregation", agg.method]
    if agg.method == "trimmed-mean":
        flags += ["--trim-ratio", f"{agg.trim_ratio:g}"]
    if agg.clip_update_norm is not None:
        flags += ["--clip-update-norm", f"{agg.clip_update_norm:g}"]
    return flags


def run_case(
    data: EmotionDataset,
    args: argparse.Namespace,
    name: str,
    agg: AggregationConfig,
    scale: float | None,
) -> dict[str, Any]:
    """One simulated run; `scale` None is clean, otherwise the attacker's scale."""
    devices: list[ClientRuntime] = []
    attacker = client_id(args.attacker)

    def make(cid: str, run: str, tr: EmotionDataset, te: EmotionDataset) -> ClientRuntime:
        if scale is not None and cid == attacker:
            rt: ClientRuntime = PoisonRuntime(cid, run, tr, te, scale=scale)
        else:
            rt = NormProbeRuntime(cid, run, tr, te)
        devices.append(rt)
        return rt

    spec = SimSpec(
        args.algo, args.clients, args.rounds, seed=args.seed,
        train=TrainConfig(batch_size=args.batch_size), aggregation=agg, runtime_factory=make,
    )  # fmt: skip
    m = simulate(data, spec)
    honest = [d for d in devices if not isinstance(d, PoisonRuntime)]
    norms = [n for d in honest for n in d.norms]  # type: ignore[attr-defined]
    halves = sorted({h for n in norms for h in n})
    acc = [r["test_accuracy"] for r in m["rounds"]]
    return {
        "rule": name,
        "flags": " ".join(serve_flags(agg)),
        "attack": "clean" if scale is None else f"scale {scale:g}",
        "final_test_accuracy": m["final"]["test_accuracy"],
        "final_macro_f1": m["final"]["macro_f1"],
        "best_test_accuracy": max(acc) if acc else None,
        "finite": bool(np.isfinite(m["rounds"][-1]["train_loss"])) if m["rounds"] else False,
        "honest_update_norm": {
            h: {
                "median": float(np.median([n[h] for n in norms if h in n])),
                "max": float(np.max([n[h] for n in norms if h in n])),
            }
            for h in halves
        },
        "train_seconds": m.get("train_seconds"),
    }


def table(rows: list[dict[str, Any]], clean: float) -> str:
    """One line per (rule, attack), with the distance from the clean plain mean."""
    out = [
        "| rule | serve flags | attack | final test accuracy | vs clean mean | within 3 pts |",
        "|---|---|---|---:|---:|:---:|",
    ]
    for r in rows:
        acc = r["final_test_accuracy"]
        gap = acc - clean
        ok = "yes" if gap >= -MARGIN else "no"
        out.append(
            f"| {r['rule']} | `{r['flags']}` | {r['attack']} | {100 * acc:.1f} % "
            f"| {100 * gap:+.1f} | {ok} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--algo", default="sflv1", choices=["sflv1", "sflv2", "fedavg"])
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--identities", type=int, default=40, help="people in the synthetic set")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacker", type=int, default=1, help="index of the malicious device")
    p.add_argument("--scale", type=float, action="append", help="attack scale(s) [-100, 100, -1]")
    p.add_argument("--rule", action="append", help="robust rule(s) [trimmed-mean:0.2@2.5]")
    p.add_argument("--no-clean-robust", action="store_true", help="skip the robust clean runs")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    scales = args.scale or [-100.0, 100.0, -1.0]
    rules = {name: parse_rule(name) for name in (args.rule or ["trimmed-mean:0.2@2.5"])}
    mean = AggregationConfig()
    data = generate_synth(SynthConfig(identities=args.identities))

    rows = [run_case(data, args, "mean", mean, None)]
    clean = rows[0]["final_test_accuracy"]
    print(f"clean mean: {100 * clean:.1f} %  honest norms {rows[0]['honest_update_norm']}")
    for s in scales:
        rows.append(run_case(data, args, "mean", mean, s))
        print(f"poison {s:g} mean: {100 * rows[-1]['final_test_accuracy']:.1f} %", flush=True)
    for name, agg in rules.items():
        cases: list[float | None] = ([] if args.no_clean_robust else [None]) + list(scales)
        for s in cases:
            rows.append(run_case(data, args, name, agg, s))
            what = "clean" if s is None else f"poison {s:g}"
            print(f"{what} {name}: {100 * rows[-1]['final_test_accuracy']:.1f} %", flush=True)

    setting = (
        f"{args.algo}, {args.clients} clients (client-{args.attacker:02d} malicious), "
        f"{args.rounds} rounds, synthetic set of {args.identities} people, seed {args.seed}, "
        f"batch {args.batch_size}"
    )
    norms = ", ".join(
        f"{h}: median {v['median']:.2f}, max {v['max']:.2f}"
        for h, v in rows[0]["honest_update_norm"].items()
    )
    md = (
        f"# One malicious device against the aggregation rules\n\n{setting}. The attacker sends "
        "global + scale x its honest update of the client half. Target: robust rule under "
        f"attack within 3 points of the clean plain mean ({100 * clean:.1f} %).\n\n"
        f"{table(rows, clean)}\n\nHonest update L2 norms in the clean mean run ({norms}); "
        "`--clip-update-norm` bounds exactly this norm.\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robust.md").write_text(md)
    (args.out / "robust.json").write_text(
        json.dumps({"setting": setting, "margin": MARGIN, "rows": rows}, indent=1)
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
