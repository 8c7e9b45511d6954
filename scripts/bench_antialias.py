#!/usr/bin/env python
"""What anti-aliased downsampling (`ModelConfig.antialias`) costs in compute, side by side.

For the default network with and without the blur: one training step of both halves on a batch
of 16 (forward, backward, Adam), the torch client half on one crop, and the exported ONNX client
half (fp32 and int8, through the agent's `OnnxClient`) on one crop. The two networks are timed
in alternation, round after round, and the medians are reported with their ratio, so a busy
machine slows both alike. One thread, as on a small edge CPU. Accuracy is measured elsewhere
(`scripts/probe_cells.py ...:aa=1`, BENCHMARKS.md).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_antialias.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from splitfed.data.batches import to_tensor
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig, build_split_model
from splitfed.onnx_client import OnnxClient
from splitfed.quantize import export_client


def timed(fn: Callable[[], object], repeat: int) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="alternations of the two networks")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = generate_synth(SynthConfig(identities=6, per_emotion=2))
    batch, labels = to_tensor(data.images[:16]), torch.from_numpy(data.labels[:16]).long()
    crop = data.images[:1]
    jobs: dict[str, dict[bool, Callable[[], object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for antialias in (False, True):
            cfg = ModelConfig(antialias=antialias)
            client, server = build_split_model(cfg, 0)
            opt = torch.optim.Adam([*client.parameters(), *server.parameters()])

            def step(client=client, server=server, opt=opt) -> None:
                opt.zero_grad()
                F.cross_entropy(server(client(batch)), labels).backward()
                opt.step()

            def forward(client=client) -> None:
                with torch.no_grad():
                    client(to_tensor(crop))

            out = Path(tmp) / str(antialias)
            client.eval()
            export_client(client, cfg, out, calibration=data.images[:64], version="bench")
            jobs.setdefault("training step, batch 16 (torch, both halves)", {})[antialias] = step
            jobs.setdefault("client half, one crop (torch)", {})[antialias] = forward
            for kind in ("fp32", "int8"):
                onnx = OnnxClient(out / f"client_{kind}.onnx")
                jobs.setdefault(f"client half, one crop (ONNX {kind})", {})[antialias] = (
                    lambda onnx=onnx: onnx.run_crops(crop)
                )
            client.train()
        times: dict[str, dict[bool, list[float]]] = {k: {False: [], True: []} for k in jobs}
        for _ in range(args.rounds):
            for name, pair in jobs.items():
                repeat = 5 if name.startswith("training") else 100
                for antialias, fn in pair.items():
                    times[name][antialias].append(timed(fn, repeat))
    print("| what | without | with antialias | ratio |")
    print("|---|---:|---:|---:|")
    for name, pair in times.items():
        plain, blurred = np.median(pair[False]), np.median(pair[True])
        print(f"| {name} | {1e3 * plain:.2f} ms | {1e3 * blurred:.2f} ms | {blurred / plain:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
