#!/usr/bin/env python
"""Server-half batching for SFLV1, measured before it is built: is it exact, and is it faster?

SFLV1 keeps one server-half copy per device. When several devices' SMASHED batches wait at
once, a worker could stack them and run the copies as one call: `torch.func.vmap` over the
copies' stacked parameters and BatchNorm buffers (one grouped convolution per layer), with
each copy's dropout mask drawn under its own seed exactly as `nn.Dropout` draws it, one
backward for all, then each copy's own optimizer step. This script runs that candidate beside
the product's per-copy step (`SplitCNN.server_step`, on wire messages, as `aggregator serve`
runs it) on the same copies and batches, and reports

- exactness: the largest difference of parameters, activation gradients and BatchNorm running
  statistics after 1 and after `--steps` steps, and whether they are equal bit for bit;
- speed: milliseconds per step of K copies and the ratio, measured alternately, best of
  `--repeats`, for several K and batch sizes, every process on one torch thread.

    python scripts/bench_server_batching.py                       # K = 1,4,10,50; batch 8, 32
    python scripts/bench_server_batching.py --copies 2,8 --batch-sizes 32 --out /tmp/b.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from splitfed.algorithms.sflv1 import SFLV1  # noqa: E402
from splitfed.config import TrainConfig  # noqa: E402
from splitfed.model import ModelConfig, ServerNet, seeded, smashed_shape  # noqa: E402
from splitfed.wire import Message, MsgType, Sequencer, pack_activations  # noqa: E402

RUN, RND = "bench", 1


def product(k: int, seed: int = 0) -> tuple[SFLV1, list[str]]:
    """An SFLV1 strategy with `k` server copies, as a worker holds them mid-round."""
    algo = SFLV1(ModelConfig(), TrainConfig(), seed)
    ids = [f"client-{i:02d}" for i in range(k)]
    algo.enrol(ids)
    for cid in ids:
        algo.copies[cid] = algo._copy_for(cid)
    return algo, ids


def messages(ids: list[str], batch: int, step: int, rng: np.random.Generator) -> list[Message]:
    shape = smashed_shape(ModelConfig())
    out = []
    for cid in ids:
        x = np.maximum(rng.standard_normal((batch, *shape)), 0).astype(np.float32)
        y = rng.integers(0, 7, batch).astype(np.int64)
        t = {**pack_activations(x, "fp32"), "labels": y}
        out.append(Sequencer(cid, RUN).make(MsgType.SMASHED, RND, {"step": step}, t))
    return out


def step_each(algo: SFLV1, ids: list[str], msgs: list[Message]) -> list[np.ndarray]:
    """The product: one `server_step` per message, each on its device's copy."""
    return [algo.server_step(*algo.copies[c], m, RND)[0] for c, m in zip(ids, msgs)]


def step_batched(algo: SFLV1, ids: list[str], msgs: list[Message]) -> list[np.ndarray]:
    """The candidate: every copy in one vmapped forward and backward, then each optimizer."""
    nets: list[ServerNet] = [algo.copies[c][0] for c in ids]
    template = copy.deepcopy(nets[0])
    params, buffers = stack_module_state(nets)
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.clone() for k, v in buffers.items()}
    acts = torch.stack([torch.from_numpy(m.tensors["activations"]) for m in msgs])
    acts.requires_grad_(True)
    labels = torch.stack([torch.from_numpy(m.tensors["labels"]) for m in msgs])
    p = template.dropout.p
    feat = torch.Size((acts.shape[1], template.fc.in_features))
    masks = []
    for c, m in zip(ids, msgs):  # the draws nn.Dropout makes under the copy's own seed
        with seeded(algo.seed, RND, algo.client_index(c), int(m.env.body["step"]), 1):
            masks.append(torch.empty(feat).bernoulli_(1 - p).div_(1 - p))

    def forward(
        pr: dict[str, Any], bu: dict[str, Any], x: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        h = functional_call(template.blocks, _sub(pr, bu, "blocks."), (x,))
        f = template.pool(h).flatten(1) * mask
        return nn.functional.linear(f, pr["fc.weight"], pr["fc.bias"])

    for n in nets:
        n.train()
    out = vmap(forward)(params, buffers, acts, torch.stack(masks))
    k, b = labels.shape
    loss = nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten(), reduction="none")
    loss.view(k, b).mean(1).sum().backward()
    for i, c in enumerate(ids):
        net, opt = algo.copies[c]
        with torch.no_grad():
            for name, q in net.named_parameters():
                q.grad = params[name].grad[i].clone()
            for name, buf in net.named_buffers():
                buf.copy_(buffers[name][i])
        opt.step()
    assert acts.grad is not None
    return [g.numpy() for g in acts.grad]


def _sub(pr: dict[str, Any], bu: dict[str, Any], prefix: str) -> tuple[dict, dict]:
    n = len(prefix)
    return (
        {k[n:]: v for k, v in pr.items() if k.startswith(prefix)},
        {k[n:]: v for k, v in bu.items() if k.startswith(prefix)},
    )


def _diff(a: SFLV1, b: SFLV1, ids: list[str]) -> tuple[float, float, bool]:
    """Largest |difference| of parameters and of BatchNorm statistics; all bitwise equal?"""
    dp = db = 0.0
    equal = True
    for c in ids:
        sa, sb = a.copies[c][0].state_dict(), b.copies[c][0].state_dict()
        for k in sa:
            d = float((sa[k].double() - sb[k].double()).abs().max())
            equal &= torch.equal(sa[k], sb[k])
            if "running" in k:
                db = max(db, d)
            elif "num_batches" not in k:
                dp = max(dp, d)
    return dp, db, equal


def exactness(k: int, batch: int, steps: int) -> dict[str, Any]:
    (a, ids), (b, _) = product(k), product(k)
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    row: dict[str, Any] = {"copies": k, "batch": batch}
    for s in range(steps):
        ga = step_each(a, ids, messages(ids, batch, s, rng_a))
        gb = step_batched(b, ids, messages(ids, batch, s, rng_b))
        if s in (0, steps - 1):
            dp, db, eq = _diff(a, b, ids)
            dg = max(float(np.abs(x - y).max()) for x, y in zip(ga, gb))
            eq &= all(np.array_equal(x, y) for x, y in zip(ga, gb))
            tag = "1" if s == 0 else "n"
            row.update({f"param_{tag}": dp, f"bn_{tag}": db, f"grad_{tag}": dg, f"equal_{tag}": eq})
    return row


def speed(k: int, batch: int, repeats: int, inner: int) -> dict[str, Any]:
    algo, ids = product(k)
    rng = np.random.default_rng(2)
    msgs = messages(ids, batch, 0, rng)
    best = {"per_copy": float("inf"), "batched": float("inf")}
    fns = {"per_copy": step_each, "batched": step_batched}
    for f in fns.values():  # warm-up: first calls pay for allocation and kernel choice
        f(algo, ids, msgs)
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f(algo, ids, msgs)
            best[name] = min(best[name], (time.perf_counter() - t) / inner)
    return {
        "copies": k,
        "batch": batch,
        "per_copy_ms": 1e3 * best["per_copy"],
        "batched_ms": 1e3 * best["batched"],
        "per_copy_sps": k * batch / best["per_copy"],
        "batched_sps": k * batch / best["batched"],
        "speedup": best["per_copy"] / best["batched"],
    }


def report(exact: list[dict[str, Any]], fast: list[dict[str, Any]], args: Any) -> str:
    lines = [
        "## SFLV1 server-half batching: measured, not built (`scripts/bench_server_batching.py`)",
        "",
        f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__},"
        f" Python {platform.python_version()}. The product's per-copy server step "
        "(`SplitCNN.server_step` on wire messages, as a worker runs it) beside the candidate: "
        "the copies' stacked parameters and BatchNorm buffers in one `torch.func.vmap` forward "
        "and backward, each copy's dropout drawn under its own seed, then each copy's own Adam "
        "step. Same copies, same batches.",
        "",
        f"### Exactness (after 1 and after {args.steps} steps)",
        "",
        "| copies | batch | max param diff, 1 | max param diff, n | max BN stat diff, n "
        "| max act-grad diff, n | bitwise equal after 1 | after n |",
        "|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    for r in exact:
        lines.append(
            f"| {r['copies']} | {r['batch']} | {r['param_1']:.1e} | {r['param_n']:.1e} | "
            f"{r['bn_n']:.1e} | {r['grad_n']:.1e} | {'yes' if r['equal_1'] else 'no'} | "
            f"{'yes' if r['equal_n'] else 'no'} |"
        )
    lines += [
        "",
        f"### Speed (best of {args.repeats} alternating repeats of {args.inner} steps)",
        "",
        "| copies | batch | per-copy ms/step | batched ms/step | per-copy samples/s "
        "| batched samples/s | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in fast:
        lines.append(
            f"| {r['copies']} | {r['batch']} | {r['per_copy_ms']:.1f} | {r['batched_ms']:.1f} | "
            f"{r['per_copy_sps']:.0f} | {r['batched_sps']:.0f} | {r['speedup']:.2f}x |"
        )
    ups = [r["speedup"] for r in fast]
    exact_all = all(r["equal_n"] for r in exact)
    lines += [
        "",
        f"Speed-up range {min(ups):.2f}x to {max(ups):.2f}x; bitwise equal: "
        f"{'yes' if exact_all else 'no'}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", default="1,4,10,50", help="comma-separated copy counts K")
    ap.add_argument("--batch-sizes", default="8,32", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=20, help="steps of the exactness check")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inner", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "batching.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ks = [int(x) for x in args.copies.split(",")]
    bs = [int(x) for x in args.batch_sizes.split(",")]
    exact = [exactness(k, b, args.steps) for k in sorted({min(ks), 4}) for b in bs[-1:]]
    fast = []
    for b in bs:
        for k in ks:
            fast.append(speed(k, b, args.repeats, args.inner))
            print(fast[-1], flush=True)
    text = report(exact, fast, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
