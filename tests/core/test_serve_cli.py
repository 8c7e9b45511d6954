"""`aggregator serve` takes the server-optimizer flags exactly as `simulate` does (one definition,
aggregator.options), and a flag still overrides only its own key of the YAML config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import aggregator.serve as serve_mod
from aggregator.cli import main


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ServeConfig `serve` would run with; no broker, no training."""
    got: list[Any] = []

    def fake_run_serve(cfg: Any, **_: Any) -> None:
        got.append(cfg)

    monkeypatch.setattr(serve_mod, "run_serve", fake_run_serve)
    return got


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def param(command: str, name: str) -> click.Parameter:
    cmd = main.commands[command]
    return next(p for p in cmd.params if p.name == name)


def test_serve_help_lists_sgd_and_auto() -> None:
    code, out = invoke("serve", "--help")
    assert code == 0, out
    assert "sgd" in out and "auto" in out


def test_serve_and_simulate_take_the_same_server_flags() -> None:
    for name in ("server_opt", "server_lr", "server_momentum"):
        sim, srv = param("simulate", name), param("serve", name)
        assert type(sim.type) is type(srv.type), name
    opt_sim, opt_srv = param("simulate", "server_opt").type, param("serve", "server_opt").type
    assert isinstance(opt_sim, click.Choice) and isinstance(opt_srv, click.Choice)
    assert list(opt_srv.choices) == list(opt_sim.choices) == ["none", "sgd", "momentum", "adam"]
    # serve's unset flags are None, so that its YAML config stands.
    assert param("serve", "server_opt").default is None
    assert param("serve", "server_momentum").default is None


@pytest.mark.parametrize(("lr", "at_four"), [("auto", 4.0), ("sqrt", 2.0)])
def test_serve_parses_sgd_with_a_named_lr(
    parsed: list[Any], tmp_path: Path, lr: str, at_four: float
) -> None:
    code, out = invoke("serve", "--server-opt", "sgd", "--server-lr", lr, "--out", str(tmp_path))
    assert code == 0, out
    agg = parsed[0].aggregation
    assert agg.server_opt == "sgd" and agg.server_lr == lr
    assert agg.server_lr_for(4) == at_four


def test_serve_server_lr_number_and_bad_values(parsed: list[Any], tmp_path: Path) -> None:
    code, out = invoke(
        "serve", "--server-opt", "adam", "--server-lr", "0.05", "--out", str(tmp_path)
    )
    assert code == 0, out
    assert parsed[-1].aggregation.server_lr == 0.05
    code, out = invoke("serve", "--server-lr", "twice", "--out", str(tmp_path))
    assert code == 2 and "neither auto, sqrt nor a number" in out
    code, out = invoke("serve", "--server-lr", "0", "--out", str(tmp_path))
    assert code == 2 and "server_lr" in out and "Traceback" not in out
    code, out = invoke("simulate", "--algo", "sl", "--server-lr", "twice", "--out", str(tmp_path))
    assert code == 2 and "neither auto, sqrt nor a number" in out


def test_serve_flags_override_only_their_yaml_keys(parsed: list[Any], tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "aggregation:\n  server_opt: momentum\n  server_lr: auto\n  server_momentum: 0.5\n"
    )
    code, out = invoke("serve", "--config", str(cfg), "--out", str(tmp_path))
    assert code == 0, out
    agg = parsed[-1].aggregation
    assert (agg.server_opt, agg.server_lr, agg.server_momentum) == ("momentum", "auto", 0.5)
    code, out = invoke("serve", "--config", str(cfg), "--server-opt", "sgd", "--out", str(tmp_path))
    assert code == 0, out
    agg = parsed[-1].aggregation
    assert (agg.server_opt, agg.server_lr, agg.server_momentum) == ("sgd", "auto", 0.5)
    code, out = invoke("serve", "--out", str(tmp_path))  # neither: AggregationConfig's defaults
    assert code == 0, out
    agg = parsed[-1].aggregation
    assert (agg.server_opt, agg.server_lr, agg.server_momentum) == ("none", None, 0.9)


def test_serve_takes_the_input_recipe(parsed: list[Any], tmp_path: Path) -> None:
    yaml_path = tmp_path / "serve.yaml"
    yaml_path.write_text("train:\n  batch_size: 8\n  jitter:\n    camera:\n      blur: 2.0\n")
    code, out = invoke("serve", "--config", str(yaml_path), "--input-norm", "per-crop",
                       "--camera-jitter", "0.25", "--zoom-jitter", "0.1", "--roll-jitter", "3",
                       "--offset-jitter", "0.05", "--antialias",
                       "--out", str(tmp_path))  # fmt: skip
    assert code == 0, out
    cfg = parsed[-1]
    assert cfg.model.input_norm == "per-crop" and cfg.model.antialias is True
    assert cfg.train.jitter.camera.p == 0.25 and cfg.train.jitter.camera.blur == 2.0
    assert (cfg.train.jitter.scale, cfg.train.jitter.rotation) == (0.1, 3.0)
    assert cfg.train.jitter.shift_y == 0.05
    assert cfg.train.batch_size == 8  # the flags moved only their own keys


def test_serve_takes_a_named_recipe_under_its_own_flags(parsed: list[Any], tmp_path: Path) -> None:
    code, out = invoke("serve", "--recipe", "other-cameras", "--camera-jitter", "0.5",
                       "--out", str(tmp_path))  # fmt: skip
    assert code == 0, out
    cfg = parsed[-1]
    assert cfg.model.antialias is True and cfg.train.jitter.camera.p == 0.5
    jitter = cfg.train.jitter
    assert (jitter.scale, jitter.rotation, jitter.shift_y) == (0.2, 5.0, 0.1)
    assert cfg.rounds == 160
