"""The simulated runs of `simulate` and `compare`, one after another or in parallel processes.

A run is seeded and runs on a fixed number of torch threads, so where it runs changes none of
its numbers: `compare --jobs 2` gives the table of `--jobs 1` in about half the time on two
cores (tests/core/test_jobs.py holds it). Each run keeps its own progress bar either way.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from aggregator.options import quiet_simulation, round_progress, set_threads, setup_logging

if TYPE_CHECKING:  # torch loads only when a run starts, not for `aggregator --help`
    from splitfed.data.dataset import EmotionDataset
    from splitfed.simulate import SimSpec

Task = tuple["SimSpec", str]  # a run and its label


def run_one(ds: EmotionDataset, spec: SimSpec, folds: int | None, on_round: Any) -> dict[str, Any]:
    """One simulated run, or `folds` of them by person combined."""
    from splitfed.crossval import cross_validate
    from splitfed.simulate import simulate

    if folds:
        return cross_validate(ds, spec, folds, on_round)
    return simulate(ds, spec, on_round)


def run_tasks(
    ds: EmotionDataset, tasks: list[Task], folds: int | None, jobs: int, threads: int, verbose: bool
) -> list[dict[str, Any]]:
    """Every task's metrics, in the order of `tasks`, with up to `jobs` running at once."""
    total = [spec.rounds * (folds or 1) for spec, _ in tasks]
    labels = [label if not folds else f"{label}, {folds} folds" for _, label in tasks]
    progress, on_rounds = round_progress(list(zip(total, labels)))
    if jobs <= 1 or len(tasks) <= 1:
        with progress:
            return [run_one(ds, spec, folds, on_rounds[i]) for i, (spec, _) in enumerate(tasks)]
    # Spawned, not forked: a fork of a process whose torch thread pools are up can hang.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, progress:
        rounds = manager.Queue()
        with ProcessPoolExecutor(
            max_workers=min(jobs, len(tasks)),
            mp_context=ctx,
            initializer=_start_worker,
            initargs=(threads, verbose),
        ) as pool:
            futures = [
                pool.submit(_run_task, ds, spec, folds, i, rounds)
                for i, (spec, _) in enumerate(tasks)
            ]
            pending: set[Future[dict[str, Any]]] = set(futures)
            while pending:
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                while not rounds.empty():
                    i, row = rounds.get()
                    on_rounds[i](row)
            return [f.result() for f in futures]  # a run's exception surfaces here


def _start_worker(threads: int, verbose: bool) -> None:
    setup_logging(verbose)
    quiet_simulation(verbose)
    set_threads(threads)


def _run_task(
    ds: EmotionDataset, spec: SimSpec, folds: int | None, index: int, rounds: Any
) -> dict[str, Any]:
    def on_round(row: dict[str, Any]) -> None:
        rounds.put((index, {k: row[k] for k in ("train_loss", "test_accuracy")}))

    return run_one(ds, spec, folds, on_round)
