#!/usr/bin/env python
"""What test-time averaging (`inference.tta`) costs the device's offline live inference, per frame.

The full ONNX model (`sfl-export --full-model`, fp32 and int8, through the agent's
`OnnxClient`) on one crop, plain (`OnnxClient.run_crops`, what the agent runs without the flag)
and averaged over the band's nine placements (`splitfed.data.tta.averaged_logits`, what it runs
with it: the eight warps, one forward pass of nine views, the mean of the softmaxes). The two
are timed in alternation, round after round, and the medians are reported with their ratio, so
a busy machine slows both alike. One thread, as on a small edge CPU. Weights do not change the
time, so the network is the default one untrained; what averaging gains is measured elsewhere
(`scripts/probe_cells.py`, BENCHMARKS.md "Test-time averaging").

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_live_tta.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.data.tta import averaged_logits
from splitfed.model import ModelConfig, build_split_model
from splitfed.onnx_client import OnnxClient
from splitfed.quantize import export_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_antialias import timed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="alternations of the two paths")
    ap.add_argument("--repeat", type=int, default=100, help="frames per path and round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = generate_synth(SynthConfig(identities=6, per_emotion=2))
    crop = data.images[:1]
    cfg = ModelConfig(input_shape=data.input_shape, input_norm="per-crop")
    client, server = build_split_model(cfg, 0)
    jobs: dict[str, dict[str, Callable[[], object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_client(client, cfg, Path(tmp), calibration=data.images[:64], server_net=server,
                      full_model=True, version="bench")  # fmt: skip
        for kind in ("fp32", "int8"):
            full = OnnxClient(Path(tmp) / f"full_{kind}.onnx", expected_input=cfg.input_shape)
            averaged = averaged_logits(full.run_crops)
            jobs[f"full model, one frame (ONNX {kind})"] = {
                "plain": lambda full=full: full.run_crops(crop),
                "averaged": lambda averaged=averaged: averaged(crop),
            }
        times = {k: {"plain": [], "averaged": []} for k in jobs}
        for _ in range(args.rounds):
            for name, pair in jobs.items():
                for how, fn in pair.items():
                    times[name][how].append(timed(fn, args.repeat))
    print("| what | plain | averaged (nine placements) | ratio |")
    print("|---|---:|---:|---:|")
    for name, pair in times.items():
        plain, averaged = np.median(pair["plain"]), np.median(pair["averaged"])
        print(f"| {name} | {1e3 * plain:.3f} ms | {1e3 * averaged:.3f} ms "
              f"| {averaged / plain:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
