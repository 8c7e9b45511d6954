"""`compare --jobs N`: runs in parallel processes give the numbers of runs one after another."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from aggregator.cli import main

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
