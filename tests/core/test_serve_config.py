"""`serve` deploys the registry's served algorithms, and its config refuses the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.serve_config import (
    OWN_DATA_ALGOS,
    SERVE_ALGOS,
    SERVE_SPLIT_ALGOS,
    ServeConfig,
    load_serve_config,
)
from splitfed.errors import UserError
from splitfed.simulate import REGISTRY, served_names


def test_serve_deploys_what_the_registry_marks_served() -> None:
    assert list(SERVE_ALGOS) == served_names()
    # one split CNN on whole crops: the algorithms without a simulator of their own
    assert set(SERVE_SPLIT_ALGOS) == {n for n in SERVE_ALGOS if REGISTRY[n].simulate is None}
    assert set(OWN_DATA_ALGOS) == set(SERVE_ALGOS) - set(SERVE_SPLIT_ALGOS)


def test_the_config_takes_every_served_algorithm_and_no_other() -> None:
    for name in SERVE_ALGOS:
        assert ServeConfig(algo=name).algo == name
    assert "centralized" in REGISTRY
    with pytest.raises(UserError, match="algo"):
        load_serve_config(None, {"algo": "centralized"})


def test_a_bad_field_in_the_yaml_names_its_line(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("algo: sflv1\ntrain:\n  batch_size: 8\n  lr: -1\n")
    with pytest.raises(UserError, match=r"serve\.yaml line 4: train\.lr"):
        load_serve_config(cfg, {})
    # a flag's bad value names the field; its line is no line of the file
    with pytest.raises(UserError, match=r"serve\.yaml: min_clients"):
        load_serve_config(cfg, {"min_clients": 0})


def test_a_password_in_the_yaml_is_refused_with_the_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("broker:\n  url: mqtt://127.0.0.1:1883\n  password: hunter2\n")
    with pytest.raises(UserError, match=r"line 3: broker\.password: .*password_file"):
        load_serve_config(cfg, {})
