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
