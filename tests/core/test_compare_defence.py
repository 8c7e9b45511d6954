"""`aggregator compare --defence/--shape`: the smashed-data algorithms get them, the others not."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from aggregator.cli import main

SMALL = ["--synth-identities", "8", "--rounds", "1", "--batch-size", "16", "--no-shift"]


def test_compare_applies_defence_and_shape_to_split_algorithms(tmp_path: Path) -> None:
    args = ["compare", "--algos", "sl,fedavg", "--clients", "2", *SMALL, "--out", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--shape", "u", "--defence", "noise-1"])
    assert result.exit_code == 0, result.output
    sl = json.loads((tmp_path / "sl-2" / "metrics.json").read_text())
    fedavg = json.loads((tmp_path / "fedavg-2" / "metrics.json").read_text())
    assert sl["defence"]["noise"] == 1.0 and sl["model"]["shape"] == "u"
    assert fedavg["defence"]["noise"] == 0.0 and fedavg["model"]["shape"] == "standard"
    assert "for sl only; fedavg send no smashed data" in " ".join(result.output.split())


def test_compare_without_them_is_unchanged(tmp_path: Path) -> None:
    args = ["compare", "--algos", "sl", "--clients", "2", *SMALL, "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    sl = json.loads((tmp_path / "sl-2" / "metrics.json").read_text())
    assert sl["defence"]["noise"] == 0.0 and sl["model"]["shape"] == "standard"
    assert "send no smashed data" not in result.output
