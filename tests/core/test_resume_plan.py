"""A resumed run keeps the plan it was started with: the rounds its learning-rate schedule was
laid out for are in its checkpoint, and `serve` without `--rounds` trains to them, not to
whatever the default is today (it moved from 10 to 40 to 80)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aggregator.serve import resolve_rounds
from aggregator.serve_config import ServeConfig
from splitfed.algorithms.centralized import Centralized
from splitfed.checkpoint import INFO_FILE, planned_rounds
from splitfed.config import DEFAULT_ROUNDS, TrainConfig
from splitfed.data.dataset import default_split, train_test_split
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig
from splitfed.runner import RunOptions, run


def centralized_run(checkpoint: Path, rounds: int) -> tuple[Centralized, dict]:
    data = generate_synth(SynthConfig(identities=6, per_emotion=1))
    train, test = train_test_split(data, default_split(data), seed=0)
    algo = Centralized(ModelConfig(input_shape=data.input_shape), TrainConfig(batch_size=16), 0)
    algo.attach_data(train, test)
    return algo, run(algo, None, RunOptions(rounds=rounds, checkpoint_dir=checkpoint))


def test_the_checkpoint_records_the_plan_and_a_changed_plan_is_named_on_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "checkpoint"
    _, first = centralized_run(ckpt, 2)
    assert planned_rounds(ckpt, "centralized") == 2 and len(first["rounds"]) == 2
    with caplog.at_level(logging.WARNING, logger="splitfed.runner"):
        _, same = centralized_run(ckpt, 2)  # finished: nothing to train, nothing to warn of
    assert not caplog.records and [r["round"] for r in same["rounds"]] == [1, 2]
    with caplog.at_level(logging.WARNING, logger="splitfed.runner"):
        algo, longer = centralized_run(ckpt, 3)
    assert [r["round"] for r in longer["rounds"]] == [1, 2, 3]
    assert "planned for 2 rounds and now runs to 3" in caplog.text
    assert "changes from round 3" in caplog.text
    assert planned_rounds(ckpt, "centralized") == 3  # the new plan is the one checkpointed
    assert algo.total_rounds == 3


def test_serve_without_rounds_trains_to_the_resumed_plan(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint"
    centralized_run(ckpt, 2)
    cfg = ServeConfig(algo="sflv1", out=tmp_path / "out", checkpoint_dir=ckpt)
    # Another algorithm's checkpoint is not resumed (splitfed.runner), so its plan is not taken.
    assert resolve_rounds(cfg).rounds == DEFAULT_ROUNDS
    (ckpt / INFO_FILE).write_text(
        (ckpt / INFO_FILE).read_text().replace('"centralized"', '"sflv1"')
    )
    assert cfg.rounds is None
    assert resolve_rounds(cfg).rounds == 2
    assert resolve_rounds(cfg.model_copy(update={"rounds": 5})).rounds == 5  # the flag wins
    assert resolve_rounds(cfg.model_copy(update={"resume": False})).rounds == DEFAULT_ROUNDS
    fresh = ServeConfig(out=tmp_path / "elsewhere")
    assert resolve_rounds(fresh).rounds == DEFAULT_ROUNDS


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        '{"algo": "sflv1", "planned_rounds": "80"}',
        '{"algo": "sflv1", "planned_rounds": 0}',
        "[1, 2]",
        '{"algo": "sflv1"}',
    ],
)
def test_an_unreadable_or_older_checkpoint_has_no_plan(tmp_path: Path, text: str) -> None:
    (tmp_path / INFO_FILE).write_text(text)
    assert planned_rounds(tmp_path, "sflv1") is None
    assert planned_rounds(tmp_path / "missing", "sflv1") is None
