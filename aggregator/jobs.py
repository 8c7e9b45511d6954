"""The simulated runs of `simulate` and `compare`, one after another or in parallel processes.

A run is seeded and runs on a fixed number of torch threads, so where it runs changes none of
its numbers: `compare --jobs 2` gives the table of `--jobs 1` in about half the time on two
cores (tests/core/test_jobs.py holds it). With `--folds K` each fold is a run, so the K folds of
one `simulate` go side by side too. Each task keeps its own progress bar either way.

A worker lives no longer than the command (`exit_with_parent`, which `serve --workers` uses too):
killed (`kill`, a session's end), the command runs no clean-up, and without a watch its workers
would train on, orphaned, to the end of their runs.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from aggregator.options import quiet_simulation, round_progress, set_threads, setup_logging

if TYPE_CHECKING:  # torch loads only when a run starts, not for `aggregator --help`
    from splitfed.data.dataset import EmotionDataset
    from splitfed.simulate import SimSpec

Task = tuple["SimSpec", str]  # a run and its label


def run_tasks(
    ds: EmotionDataset, tasks: list[Task], folds: int | None, jobs: int, threads: int, verbose: bool
) -> list[dict[str, Any]]:
    """Every task's metrics, in the order of `tasks`, with up to `jobs` runs at once.

    With `folds`, each fold of each task is a run of its own (`splitfed.crossval.fold_specs`), so
    `simulate --folds 5 --jobs 5` trains its five folds side by side, and the folds of a slow
    task do not wait behind one process while the others idle."""
    from splitfed.crossval import finish_folds, fold_specs

    total = [spec.rounds * (folds or 1) for spec, _ in tasks]
    labels = [label if not folds else f"{label}, {folds} folds" for _, label in tasks]
    runs = [
        (i, sub)
        for i, (spec, _) in enumerate(tasks)
        for sub in (fold_specs(spec, folds) if folds else [spec])
    ]
    progress, on_rounds = round_progress(list(zip(total, labels)))
    with progress:
        results = _run_all(ds, runs, on_rounds, jobs, threads, verbose)
    if not folds:
        return results
    per_task: list[list[dict[str, Any]]] = [[] for _ in tasks]
    for (i, _), metrics in zip(runs, results):
        per_task[i].append(metrics)
    return [finish_folds(spec, m) for (spec, _), m in zip(tasks, per_task)]


def _run_all(
    ds: EmotionDataset,
    runs: list[tuple[int, SimSpec]],
    on_rounds: list[Any],
    jobs: int,
    threads: int,
    verbose: bool,
) -> list[dict[str, Any]]:
    """Each (task index, spec)'s metrics in order; a run's rounds go to its task's bar."""
    from splitfed.simulate import simulate

    if jobs <= 1 or len(runs) <= 1:
        return [simulate(ds, spec, on_rounds[i]) for i, spec in runs]
    # Spawned, not forked: a fork of a process whose torch thread pools are up can hang. The
    # rounds' queue reaches the workers as they start (no manager process to outlive us).
    ctx = multiprocessing.get_context("spawn")
    rounds = ctx.Queue()
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(runs)),
        mp_context=ctx,
        initializer=_start_worker,
        initargs=(threads, verbose, rounds),
    ) as pool:
        futures = [pool.submit(_run, ds, spec, i) for i, spec in runs]
        pending: set[Future[dict[str, Any]]] = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(rounds, on_rounds)
    _drain(rounds, on_rounds)  # the workers have exited: their last rounds are in
    return [f.result() for f in futures]  # a run's exception surfaces here


def _drain(rounds: Any, on_rounds: list[Any]) -> None:
    while True:
        try:
            i, row = rounds.get_nowait()
        except queue.Empty:
            return
        on_rounds[i](row)


_rounds: Any = None  # in a worker: the queue its runs report their rounds on


def _start_worker(threads: int, verbose: bool, rounds: Any) -> None:
    global _rounds
    _rounds = rounds
    exit_with_parent()
    setup_logging(verbose)
    quiet_simulation(verbose)
    set_threads(threads)


def exit_with_parent() -> None:
    """End this spawned process the moment the process that started it ends, however it ended."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # the parent is gone: nobody is left to take this process's results

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run(ds: EmotionDataset, spec: SimSpec, index: int) -> dict[str, Any]:
    from splitfed.simulate import simulate

    def on_round(row: dict[str, Any]) -> None:
        _rounds.put((index, {k: row[k] for k in ("train_loss", "test_accuracy")}))

    return simulate(ds, spec, on_round)
