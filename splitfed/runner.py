"""Drives an algorithm through its rounds: evaluation, metrics, checkpoints, resume.

`aggregator simulate` and `aggregator serve` both end up here; only the transport under
`ServerIO` differs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitfed.algorithms.base import Strategy
from splitfed.checkpoint import load_state, save_checkpoint
from splitfed.metrics import plot_confusion, plot_curves, write_json
from splitfed.server import ServerIO
from splitfed.training import accuracy, macro_f1

if TYPE_CHECKING:
    from splitfed.distributed import Group

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    rounds: int
    min_clients: int = 1
    join_timeout: float = 120.0
    round_timeout: float = 600.0
    out_dir: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = True
    data_info: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1
    on_round: Callable[[dict[str, Any]], None] | None = None
    # Extra measurements of the trained algorithm, stored under metrics["final"] (e.g. the
    # accuracy on the domain-shift proxy, `splitfed.data.shift.shift_metrics`).
    final_hook: Callable[[Strategy], dict[str, Any]] | None = None
    # Several aggregator workers: participants, counts and bytes are over all of them; rank 0
    # alone writes checkpoints and metrics (splitfed.distributed).
    group: Group | None = None


def _bytes(io: ServerIO | None, group: Group | None = None) -> tuple[int, int]:
    if io is None:
        return 0, 0
    if group is not None:
        up, down = group.sum_ints([io.transport.bytes_up, io.transport.bytes_down])
        return int(up), int(down)
    return io.transport.bytes_up, io.transport.bytes_down


def run(algo: Strategy, io: ServerIO | None, opts: RunOptions) -> dict[str, Any]:
    """Run all rounds and return the metrics dictionary (also written to out_dir)."""
    started = time.perf_counter()
    group = opts.group
    main = group is None or group.is_main
    participants: list[str] = []
    if algo.uses_clients:
        assert io is not None
        if group is not None:
            participants = group.wait_for_clients(io, opts.min_clients, opts.join_timeout)
            algo.merge_round = group.merge_round
        else:
            participants = io.wait_for_clients(opts.min_clients, opts.join_timeout)
        if len(participants) < opts.min_clients:
            raise RuntimeError(
                f"only {len(participants)} of {opts.min_clients} clients joined "
                f"within {opts.join_timeout:.0f} s"
            )
        algo.enrol(participants)
    rounds: list[dict[str, Any]] = []
    start = 0
    if opts.checkpoint_dir is not None and opts.resume:
        saved = load_state(opts.checkpoint_dir) if main else None
        if group is not None:  # every worker resumes from rank 0's checkpoint
            saved = group.broadcast(saved)
        if saved is not None:
            state, info = saved
            if info.get("algo") == algo.name:
                algo.load_state(state)
                rounds = list(info.get("rounds", []))
                start = int(info["round"]) + 1
                log.info("resumed %s from round %d of %s", algo.name, start, opts.checkpoint_dir)
                planned = info.get("planned_rounds")
                if planned is not None and planned != opts.rounds:
                    log.warning(
                        "the checkpointed run was planned for %d rounds and now runs to %d: "
                        "its learning-rate schedule changes from round %d on",
                        planned, opts.rounds, start + 1,
                    )  # fmt: skip
    test_conf = np.zeros((7, 7), dtype=np.int64)
    for rnd in range(start, opts.rounds):
        t0 = time.perf_counter()
        up0, down0 = _bytes(io, group)
        if io is not None:
            io.round = algo.wire_round(rnd)
            participants = _online(io, group) if algo.uses_clients else []
        if algo.uses_clients and not participants:
            raise RuntimeError(f"round {rnd}: no client online")
        algo.start_round(rnd, opts.rounds, len(participants))
        mine = participants
        if group is not None:
            algo.enrol(participants)  # the same client indices (seeds) on every worker
            mine = [c for c in participants if group.owns(c)]
        result = algo.run_round(io, rnd, mine, opts.round_timeout)  # type: ignore[arg-type]
        up1, down1 = _bytes(io, group)
        seconds = time.perf_counter() - t0
        evaluators = _online(io, group, local=True) if algo.uses_clients else []
        if (rnd + 1) % opts.eval_every == 0 or rnd == opts.rounds - 1:
            test_conf = _evaluate(algo, io, evaluators, "test", opts.round_timeout, group)
        up2, down2 = _bytes(io, group)
        row = {
            "round": rnd + 1,
            "train_loss": result.loss_sum / max(result.seen, 1),
            "train_accuracy": result.correct / max(result.seen, 1),
            "test_accuracy": accuracy(test_conf),
            "test_macro_f1": macro_f1(test_conf),
            "bytes_up": up1 - up0,
            "bytes_down": down1 - down0,
            "eval_bytes_up": up2 - up1,
            "eval_bytes_down": down2 - down1,
            "seconds": seconds,
            "samples": result.seen,
            "clients": result.completed,
            "dropped": result.dropped,
        }
        rounds.append(row)
        if opts.checkpoint_dir is not None and main:
            info = {
                "algo": algo.name, "round": rnd, "planned_rounds": opts.rounds, "rounds": rounds,
                "data": opts.data_info,
            }  # fmt: skip
            save_checkpoint(opts.checkpoint_dir, algo, info)
        # (With a fed server, it publishes the client half; this process holds none.)
        if io is not None and algo.uses_clients and algo.mode == "split" and main and not algo.fed:
            io.publish_global(
                algo.round_body(participants[0] if participants else "x"), algo.global_tensors()
            )
        if opts.on_round is not None:
            opts.on_round(row)
    evaluators = _online(io, group, local=True) if algo.uses_clients else []
    train_conf = _evaluate(algo, io, evaluators, "train", opts.round_timeout, group)
    if not rounds or rounds[-1]["round"] != opts.rounds or start >= opts.rounds:
        test_conf = _evaluate(algo, io, evaluators, "test", opts.round_timeout, group)
    total_up, total_down = _bytes(io, group)
    rejected = io.rejected_total if io is not None else 0
    if group is not None:
        rejected = int(group.sum_ints([rejected])[0])
    metrics: dict[str, Any] = {
        "algo": algo.name,
        "clients": len(algo.indices) if algo.uses_clients else 1,
        "seed": algo.seed,
        "model": algo.model_cfg.model_dump(mode="json"),
        "train": algo.train_cfg.model_dump(mode="json"),
        "rounds": rounds,
        "final": {
            "train_accuracy": accuracy(train_conf),
            "test_accuracy": accuracy(test_conf),
            "macro_f1": macro_f1(test_conf),
            "test_confusion": test_conf.tolist(),
        },
        "comm": {
            "bytes_up": total_up,
            "bytes_down": total_down,
            "train_bytes_per_round": float(
                np.mean([r["bytes_up"] + r["bytes_down"] for r in rounds])
            )
            if rounds
            else 0.0,
            "rejected_messages": rejected,
        },
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": float(sum(r["seconds"] for r in rounds)),
        "train_samples": int(sum(r["samples"] for r in rounds)),
        "data": opts.data_info,
    }
    if opts.final_hook is not None:
        metrics["final"].update(opts.final_hook(algo))
    if opts.out_dir is not None and main:
        write_outputs(metrics, opts.out_dir)
    return metrics


def _online(io: ServerIO | None, group: Group | None, local: bool = False) -> list[str]:
    """Who is online: over all workers (`local`: this worker's own of them)."""
    if io is None:
        return []
    if group is None:
        return io.online()
    everyone = group.online(io)
    return [c for c in everyone if group.owns(c)] if local else everyone


def _evaluate(
    algo: Strategy,
    io: ServerIO | None,
    evaluators: list[str],
    split: str,
    timeout: float,
    group: Group | None,
) -> np.ndarray:
    """Confusion counts of `split`, summed over the workers' agents."""
    conf = algo.evaluate(io, evaluators, split, timeout)  # type: ignore[arg-type]
    return conf if group is None else group.sum_ints(conf)


def write_outputs(metrics: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    if metrics["rounds"]:
        plot_curves(metrics, out_dir / "curves.png")
    conf = np.asarray(metrics["final"]["test_confusion"])
    acc = metrics["final"]["test_accuracy"]
    title = f"{metrics['algo']}, {metrics['clients']} clients — test accuracy {acc:.1%}"
    plot_confusion(conf, out_dir / "confusion.png", title)
