"""`aggregator simulate / compare / prepare`: outputs a person opens, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.cli import main

SMALL = ["--synth-identities", "8", "--rounds", "2", "--batch-size", "16"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output  # stdout and stderr together


def test_simulate_writes_metrics_plots_and_checkpoint(tmp_path: Path) -> None:
    code, out = invoke(
        "simulate", "--algo", "sflv2", "--clients", "2", *SMALL, "--out", str(tmp_path)
    )
    assert code == 0, out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["algo"] == "sflv2" and m["clients"] == 2 and len(m["rounds"]) == 2
    for key in (
        "round",
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "bytes_up",
        "bytes_down",
        "seconds",
    ):
        assert key in m["rounds"][0]
    assert m["rounds"][0]["bytes_up"] > 0 and m["rounds"][0]["bytes_down"] > 0
    for key in ("train_accuracy", "test_accuracy", "macro_f1"):
        assert 0.0 <= m["final"][key] <= 1.0
    assert m["data"]["split"] == "subject" and m["data"]["n_train"] > 0 and m["data"]["n_test"] > 0
    assert m["comm"]["bytes_up"] >= sum(r["bytes_up"] for r in m["rounds"])
    for name in ("curves.png", "confusion.png", "checkpoint/model.safetensors"):
        assert (tmp_path / name).stat().st_size > 1000


def test_compare_writes_table_and_plot(tmp_path: Path) -> None:
    code, out = invoke(
        "compare",
        "--algos",
        "centralized,sl,fedavg",
        "--clients",
        "2,3",
        *SMALL,
        "--out",
        str(tmp_path),
    )
    assert code == 0, out
    md = (tmp_path / "results.md").read_text()
    assert (
        md.count("| sl |") == 2 and md.count("| fedavg |") == 2 and md.count("| centralized |") == 1
    )
    assert "subject" in md
    rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 5
    assert (tmp_path / "comparison.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--algo", "nope"], "unknown algorithm"),
        (["simulate", "--algo", "sl", "--data", "/no/such/place"], "no such file or folder"),
        (["simulate", "--algo", "sflv1", "--clients", "20", "--synth-identities", "8"], "subjects"),
        (["simulate", "--algo", "sflv1", "--partition", "dirichlet:x"], "positive alpha"),
        (["compare", "--clients", "two"], "--clients"),
        (["simulate", "--algo", "sl", "--cut", "9"], "cut"),
        (["prepare", "/no/such/place"], "no such file or folder"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    code, out = invoke(*args, *(["--out", str(tmp_path)] if args[0] != "prepare" else []))
    assert code == 2, out
    assert message in out
    assert "Traceback" not in out
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 1


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "happy").mkdir(parents=True)
    code, out = invoke(
        "simulate", "--algo", "sl", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "Traceback" not in out


def test_the_input_recipe_reaches_the_run(tmp_path: Path) -> None:
    out = tmp_path / "recipe"
    code, text = invoke("simulate", "--algo", "sflv1", *SMALL, "--input-norm", "per-crop",
                        "--camera-jitter", "0.5", "--zoom-jitter", "0.2", "--roll-jitter", "5",
                        "--offset-jitter", "0.1", "--warmup-rounds", "1", "--antialias",
                        "--out", str(out))  # fmt: skip
    assert code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["input_norm"] == "per-crop" and m["model"]["antialias"] is True
    assert m["train"]["jitter"]["camera"]["p"] == 0.5
    jitter = m["train"]["jitter"]
    assert (jitter["scale"], jitter["rotation"], jitter["shift_y"]) == (0.2, 5.0, 0.1)
    assert m["train"]["warmup_rounds"] == 1
    # A pretrained network keeps the norm it learned with; asking for another is an error.
    code, text = invoke("simulate", "--algo", "sflv1", *SMALL, "--init-from", str(out),
                        "--input-norm", "global", "--out", str(tmp_path / "x"))  # fmt: skip
    assert code == 2 and "trained with per-crop" in text, text
    # The zoom's bound is JitterConfig's, reported as one line.
    code, text = invoke("simulate", "--algo", "sflv1", *SMALL, "--zoom-jitter", "0.9",
                        "--out", str(tmp_path / "y"))  # fmt: skip
    assert code == 2 and "--zoom-jitter: " in text and "0.5" in text, text
    assert "Traceback" not in text
    code, text = invoke("simulate", "--algo", "sflv1", *SMALL, "--roll-jitter", "90",
                        "--out", str(tmp_path / "z"))  # fmt: skip
    assert code == 2 and "--roll-jitter: " in text and "45" in text, text


def test_a_named_recipe_sets_its_flags_and_each_own_flag_wins(tmp_path: Path) -> None:
    out = tmp_path / "cameras"
    code, text = invoke("simulate", "--algo", "sflv1", *SMALL, "--recipe", "other-cameras",
                        "--roll-jitter", "2", "--out", str(out))  # fmt: skip
    assert code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["antialias"] is True and m["train"]["jitter"]["camera"]["p"] == 1.0
    jitter = m["train"]["jitter"]
    assert (jitter["scale"], jitter["rotation"], jitter["shift_y"]) == (0.2, 2.0, 0.1)
    assert len(m["rounds"]) == 2  # --rounds given: the recipe's 160 does not apply


def test_the_recipe_fills_only_unset_flags() -> None:
    from aggregator.cli import with_recipe
    from aggregator.options import RECIPES, apply_recipe
    from splitfed.config import DEFAULT_ROUNDS

    assert with_recipe(None, {"recipe": None})[0] == DEFAULT_ROUNDS
    rounds, kw = with_recipe(None, {"recipe": "other-cameras", "antialias": False})
    assert rounds == RECIPES["other-cameras"]["rounds"] and "rounds" not in kw
    assert kw["antialias"] is False and kw["zoom_jitter"] == 0.2  # --no-antialias wins
    assert with_recipe(40, {"recipe": "other-cameras"})[0] == 40
    # A pretrained start keeps its checkpoint's architecture, anti-aliased or not.
    pretrained = apply_recipe({"recipe": "other-cameras", "init_from": Path("ckpt")})
    assert pretrained.get("antialias") is None and pretrained["camera_jitter"] == 1.0


def test_compare_refuses_before_the_first_run_trains(tmp_path: Path) -> None:
    """PyVertical's parts refuse geometric jitter: compare says so before centralized trains."""
    out = tmp_path / "cmp"
    code, text = invoke("compare", "--algos", "centralized,pyvertical", "--clients", "2", *SMALL,
                        "--zoom-jitter", "0.1", "--no-shift", "--out", str(out))  # fmt: skip
    assert code == 2 and "pyvertical x2: pyvertical cannot jitter the geometry" in text, text
    assert "leave pyvertical out of --algos" in text
    assert not (out / "centralized").exists()
