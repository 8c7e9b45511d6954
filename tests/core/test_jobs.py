"""`compare --jobs N`: runs in parallel processes give the numbers of runs one after another, and
end with the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.cli import main
from tests.procfs import HAS_PROC, children, left_running, spawned

SMALL = ["--synth-identities", "8", "--rounds", "2", "--batch-size", "16"]
RUNS = {"centralized": "centralized", "sflv1 x2": "sflv1-2", "sl x2": "sl-2"}


def _compare(out: Path, jobs: int) -> dict[str, dict]:
    args = ["compare", "--algos", "centralized,sflv1,sl", "--clients", "2", *SMALL,
            "--jobs", str(jobs), "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return {k: json.loads((out / sub / "metrics.json").read_text()) for k, sub in RUNS.items()}


def test_parallel_runs_equal_sequential_runs(tmp_path: Path) -> None:
    one = _compare(tmp_path / "one", 1)
    two = _compare(tmp_path / "two", 2)
    for label in RUNS:
        a, b = one[label], two[label]
        assert [r["train_loss"] for r in a["rounds"]] == [r["train_loss"] for r in b["rounds"]]
        assert a["final"] == b["final"], label
    # The table keeps the order of the runs asked for, whichever finished first.
    rows = (tmp_path / "two" / "results.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["centralized", "sflv1", "sl"]


def _simulate_folds(out: Path, jobs: int) -> dict:
    args = ["simulate", "--algo", "sflv1", "--clients", "2", *SMALL, "--folds", "3",
            "--jobs", str(jobs), "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return json.loads((out / "metrics.json").read_text())


def test_folds_run_side_by_side_with_the_numbers_of_one_after_another(tmp_path: Path) -> None:
    """With --folds each fold is a run of its own: --jobs spreads one run's folds over the
    processes, and the folds, their combination and the files are those of --jobs 1."""
    one = _simulate_folds(tmp_path / "one", 1)
    two = _simulate_folds(tmp_path / "two", 2)
    assert len(two["folds"]) == 3
    for a, b in zip(one["folds"], two["folds"]):
        assert a["data"]["split"] == b["data"]["split"]
        assert [r["train_loss"] for r in a["rounds"]] == [r["train_loss"] for r in b["rounds"]]
        assert a["final"] == b["final"]
    assert one["cv"] == two["cv"] and one["final"] == two["final"]
    assert [f["data"]["split"] for f in two["folds"]] == ["fold:1/3", "fold:2/3", "fold:3/3"]
    for i in (1, 2, 3):
        kept = json.loads((tmp_path / "two" / f"fold-{i}" / "metrics.json").read_text())
        assert kept["final"] == two["folds"][i - 1]["final"]


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc (Linux)")
def test_killing_the_command_ends_its_workers(tmp_path: Path) -> None:
    """SIGKILL leaves the command no clean-up at all; its workers must not train on orphaned."""
    args = ["compare", "--algos", "centralized,sflv1", "--clients", "2", "--synth-identities",
            "8", "--rounds", "1000", "--batch-size", "16", "--jobs", "2",
            "--out", str(tmp_path / "runs")]  # fmt: skip
    cmd = subprocess.Popen(
        [sys.executable, "-c", "from aggregator.cli import main; main()", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def running() -> None:
        assert cmd.poll() is None, "compare ended before its workers started"

    try:
        workers = spawned(cmd.pid, 2, 120, running)
        assert len(workers) >= 2, children(cmd.pid)
        helpers = children(cmd.pid)  # the workers and multiprocessing's resource tracker
    finally:
        cmd.kill()
        cmd.wait()
    left = left_running(helpers, 30)
    assert not left, left
