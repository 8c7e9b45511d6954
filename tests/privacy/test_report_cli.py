"""`aggregator privacy-report`: the report a person opens, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.cli import main

SMALL = ["--synth-identities", "8", "--rounds", "2", "--batch-size", "16"]
WEAK = ["--attack-epochs", "1", "--attack-width", "4", "--inversion-steps", "2"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    # Undefended, so the report's `none` row is the checkpoint itself.
    code, text = invoke("simulate", "--algo", "sflv1", "--clients", "2", *SMALL, "--defence",
                        "none", "--out", str(out))  # fmt: skip
    assert code == 0, text
    return out


def test_report_writes_json_png_and_table(run_dir: Path, tmp_path: Path) -> None:
    code, text = invoke(
        "privacy-report",
        "--checkpoint",
        str(run_dir),
        "--synth-identities",
        "8",
        "--defence",
        "noise-2",
        *WEAK,
        "--out",
        str(tmp_path),
    )
    assert code == 0, text
    report = json.loads((tmp_path / "privacy.json").read_text())
    names = [s["name"] for s in report["settings"]]
    assert names == ["none", "noise-2"]
    keys = {"name", "defence", "test_accuracy", "ssim", "ssim_baseline", "psnr", "reid"}
    keys |= {"reid_chance", "bytes_per_sample"}
    for s in report["settings"]:
        assert keys <= s.keys()
        assert 0.0 <= s["reid"] <= 1.0 and 0.0 < s["reid_chance"] <= 0.5
        assert -1.0 <= s["ssim"] <= 1.0 and s["bytes_per_sample"] > 0
    none, noisy = report["settings"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert none["accuracy_from"] == "checkpoint"
    assert none["test_accuracy"] == metrics["final"]["test_accuracy"]
    assert noisy["accuracy_from"] == "trained" and noisy["defence"]["noise"] == 2.0
    trained = json.loads((tmp_path / "settings" / "noise-2" / "metrics.json").read_text())
    assert trained["defence"]["noise"] == 2.0
    assert noisy["test_accuracy"] == trained["final"]["test_accuracy"]
    assert report["without_attack"] == {
        "labels_on_wire": True,
        "logits_on_wire": True,
        "shape": "standard",
        "bytes_per_sample": none["bytes_per_sample"],
        "holds_client_weights": True,
    }
    assert report["people"]["victims"] >= 2
    assert (tmp_path / "reconstructions.png").stat().st_size > 2000
    assert "noise-2" in text and "labels on the wire yes" in text


def _one_line_error(code: int, text: str, needle: str) -> None:
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], text
    assert "Traceback" not in text


def test_unknown_defence(run_dir: Path, tmp_path: Path) -> None:
    code, text = invoke(
        "privacy-report",
        "--checkpoint",
        str(run_dir),
        "--defence",
        "tinfoil",
        "--out",
        str(tmp_path),
    )
    _one_line_error(code, text, "unknown defence 'tinfoil'")


def test_defence_the_checkpoint_lacks_without_training(run_dir: Path, tmp_path: Path) -> None:
    code, text = invoke(
        "privacy-report",
        "--checkpoint",
        str(run_dir),
        "--synth-identities",
        "8",
        "--defence",
        "noise-1",
        "--no-train",
        *WEAK,
        "--out",
        str(tmp_path),
    )
    _one_line_error(code, text, "not what")
    assert not (tmp_path / "privacy.json").exists()


def test_other_data_than_the_checkpoint_was_trained_on(run_dir: Path, tmp_path: Path) -> None:
    code, text = invoke(
        "privacy-report",
        "--checkpoint",
        str(run_dir),
        "--synth-identities",
        "10",
        "--out",
        str(tmp_path),
    )
    _one_line_error(code, text, "pass the data set the run was trained on")


def test_too_few_people_for_a_disjoint_split(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, text = invoke(
        "simulate",
        "--algo",
        "sl",
        "--clients",
        "2",
        "--synth-identities",
        "3",
        "--rounds",
        "1",
        "--out",
        str(run),
    )
    assert code == 0, text
    code, text = invoke(
        "privacy-report",
        "--checkpoint",
        str(run),
        "--synth-identities",
        "3",
        "--out",
        str(tmp_path),
    )
    _one_line_error(code, text, "too few people")


def test_algorithm_without_smashed_data(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, text = invoke(
        "simulate",
        "--algo",
        "fedavg",
        "--clients",
        "2",
        "--synth-identities",
        "8",
        "--rounds",
        "1",
        "--out",
        str(run),
    )
    assert code == 0, text
    code, text = invoke("privacy-report", "--checkpoint", str(run), "--out", str(tmp_path))
    _one_line_error(code, text, "only sl, sflv1, sflv2")
