"""`aggregator serve --workers N`: one aggregator as N worker processes (torch.distributed).

On one host, `--workers N` runs rank 0 in this process and spawns ranks 1..N-1 (the same
`run_serve`, with `--rank`); across hosts, start `serve --rank R --world-size N --master
ADDR:PORT` on each. Rank 0 is the `aggregator` the agents see; each agent trains with its
home worker (`splitfed.distributed.owner`, published retained on `<prefix>/<run>/<id>/assign`).
The rounds, averages and metrics are those of one worker (see splitfed.distributed).

Joining: rank 0 announces the aggregator only once every worker listens on `+/up` (each keeps
its own agents' messages), and after the join phase each worker subscribes to its agents' own
`up` topics and drops the wildcard (enrolled agents, `--allow-clients`, are homed up front).
An agent that is new after that is homed when its `online` status arrives, and its home is
published then; its JOIN can beat that subscription and reach nobody. Such an agent (online,
homed, never joined) is found at the next round boundary, rank 0 announces a new instance
and every agent JOINs again before that round starts (`Group.online`), so a late agent trains
from the next round whichever way the race went.
Only SFLV1 and FedAvg shard: SL and SFLV2 train one server half on every batch in turn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from splitfed.distributed import Group, check_algo, free_master, torch_threads_per_worker
from splitfed.errors import UserError

if TYPE_CHECKING:
    from aggregator.serve_config import ServeConfig

log = logging.getLogger(__name__)


def group_timeout(cfg: ServeConfig) -> float:
    """How long a worker waits at a collective: a whole round and its evaluations, with room."""
    return 3 * float(cfg.round_timeout) + 300.0


def serve_workers(
    cfg: ServeConfig,
    workers: int,
    rank: int | None,
    world_size: int | None,
    master: str | None,
    verbose: bool = False,
    eval_data_format: str | None = None,
    synth_identities: int = 80,
) -> dict[str, Any] | None:
    """Run this process's worker(s); returns the metrics on rank 0, None on the others."""
    if rank is not None or world_size is not None:  # one rank of a multi-host group
        if rank is None or world_size is None or master is None:
            raise UserError("--rank, --world-size and --master go together")
        if not 0 <= rank < world_size:
            raise UserError(f"--rank {rank} is not in 0..{world_size - 1}")
        if workers > 1:
            raise UserError("--workers starts the ranks of one host; with --rank leave it out")
        check_algo(cfg.algo, world_size)
        return _run_rank(cfg, rank, world_size, master, eval_data_format, synth_identities)
    if workers < 1:
        raise UserError(f"--workers takes 1 or more, not {workers}")
    check_algo(cfg.algo, workers)
    if cfg.threads is None:
        cfg = cfg.model_copy(update={"threads": torch_threads_per_worker(workers)})
    import torch.multiprocessing as mp

    master = master or free_master()
    ctx = mp.get_context("spawn")
    children = [
        ctx.Process(
            target=_child,
            args=(cfg, r, workers, master, verbose, eval_data_format, synth_identities),
            name=f"aggregator-worker-{r}",
        )
        for r in range(1, workers)
    ]
    for p in children:
        p.start()
    try:
        metrics = _run_rank(cfg, 0, workers, master, eval_data_format, synth_identities)
        for p in children:
            p.join(timeout=60)
            if p.exitcode not in (0, None):
                log.error("worker %s exited with %s", p.name, p.exitcode)
        return metrics
    finally:
        for p in children:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


def _run_rank(
    cfg: ServeConfig,
    rank: int,
    world_size: int,
    master: str,
    eval_data_format: str | None,
    synth_identities: int,
) -> dict[str, Any] | None:
    from aggregator.serve import run_serve

    group = Group(rank, world_size, master, group_timeout(cfg))
    try:
        metrics = run_serve(
            cfg,
            eval_data_format=eval_data_format,
            synth_identities=synth_identities,
            live=rank == 0,
            group=group,
        )
    finally:
        group.close()
    return metrics if rank == 0 else None


def _child(
    cfg: ServeConfig,
    rank: int,
    world_size: int,
    master: str,
    verbose: bool,
    eval_data_format: str | None,
    synth_identities: int,
) -> None:
    """A spawned worker of one host (a fresh interpreter: logging is set up again)."""
    from aggregator.jobs import exit_with_parent
    from aggregator.options import setup_logging

    exit_with_parent()  # rank 0 gone (killed), the group cannot go on without it
    setup_logging(verbose)
    _run_rank(cfg, rank, world_size, master, eval_data_format, synth_identities)


def pool_counts(group: Group, comm: Mapping[str, Any]) -> dict[str, Any]:
    """Sum per-worker counters (ints, and dicts of ints by reason) over all workers."""
    parts = group.gather(dict(comm))
    out: dict[str, Any] = {}
    for key, value in comm.items():
        if isinstance(value, Mapping):
            merged: dict[str, int] = {}
            for p in parts:
                for k, v in p[key].items():
                    merged[k] = merged.get(k, 0) + int(v)
            out[key] = merged
        else:
            out[key] = sum(int(p[key]) for p in parts)
    return out
