"""The default defence: `recommended` where the algorithm sends smashed data, `none` elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.cli import main
from aggregator.serve_config import ServeConfig
from splitfed.defences import DEFENCES, DefenceConfig, default_defence

SMALL = ["--synth-identities", "8", "--rounds", "1", "--batch-size", "16", "--no-shift"]


def simulate(tmp_path: Path, algo: str, *extra: str) -> tuple[int, str, Path]:
    out = tmp_path / algo
    args = ["simulate", "--algo", algo, "--clients", "2", *SMALL, "--out", str(out), *extra]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output, out


def test_recommended_is_a_real_defence() -> None:
    assert DEFENCES["recommended"] != DefenceConfig()


@pytest.mark.parametrize(
    ("algo", "want"), [("sl", "recommended"), ("sflv1", "recommended"), ("sflv2", "recommended"),
                       ("fedavg", "none"), ("centralized", "none"), ("pyvertical", "none"),
                       ("fedsl", "none")],
)  # fmt: skip
def test_default_resolves_per_algorithm(algo: str, want: str) -> None:
    assert default_defence(algo) == want


def test_simulate_defaults_to_recommended_for_sflv1(tmp_path: Path) -> None:
    code, output, out = simulate(tmp_path, "sflv1")
    assert code == 0, output
    m = json.loads((out / "metrics.json").read_text())
    assert m["defence"] == DEFENCES["recommended"].model_dump(mode="json")
    rec = DEFENCES["recommended"]
    if rec.cut is not None:
        assert m["model"]["cut"] == rec.cut
    if rec.compression is not None:
        assert m["train"]["compression"] == rec.compression


def test_simulate_defence_none_turns_it_off(tmp_path: Path) -> None:
    code, output, out = simulate(tmp_path, "sflv1", "--defence", "none")
    assert code == 0, output
    m = json.loads((out / "metrics.json").read_text())
    assert m["defence"] == DefenceConfig().model_dump(mode="json")
    assert m["train"]["compression"] == "fp32"


def test_simulate_fedavg_defaults_to_none(tmp_path: Path) -> None:
    code, output, out = simulate(tmp_path, "fedavg")
    assert code == 0, output
    m = json.loads((out / "metrics.json").read_text())
    assert m.get("defence", DefenceConfig().model_dump(mode="json")) == DefenceConfig().model_dump(
        mode="json"
    )


def test_explicit_defence_on_fedavg_is_one_line_error(tmp_path: Path) -> None:
    code, output, _ = simulate(tmp_path, "fedavg", "--defence", "recommended")
    assert code == 2, output
    assert "smashed data" in output and "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1


def test_help_says_what_the_default_is() -> None:
    for command in ("simulate", "serve"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert "recommended for sl, sflv1 and sflv2" in text, text
        assert "--defence none turns it off" in text, text


def test_serve_config_leaves_the_default_to_the_algorithm() -> None:
    assert ServeConfig().defence is None
    assert ServeConfig.model_validate({"defence": "none"}).defence == "none"
