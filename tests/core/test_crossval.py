"""K-fold cross-validation by person, and the domain-shift score of the final model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aggregator.cli import main
from splitfed.config import TrainConfig
from splitfed.crossval import cross_validate
from splitfed.data.dataset import (
    EmotionDataset,
    fold_people,
    fold_split,
    train_test_split,
)
from splitfed.errors import UserError
from splitfed.simulate import SimSpec, simulate

FAST = TrainConfig(batch_size=16)


def test_every_person_is_in_exactly_one_fold(small_synth: EmotionDataset) -> None:
    assert small_synth.subjects is not None
    folds = fold_people(small_synth.subjects, 5, seed=1)
    people = set(np.unique(small_synth.subjects).tolist())
    assert set().union(*folds) == people
    assert sum(len(f) for f in folds) == len(people)  # pairwise disjoint
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    assert folds == fold_people(small_synth.subjects[::-1], 5, seed=1)  # order does not matter
    assert folds != fold_people(small_synth.subjects, 5, seed=2)


def test_fold_splits_keep_people_apart_and_test_everyone_once(
    small_synth: EmotionDataset,
) -> None:
    tested: list[str] = []
    for i in range(4):
        train, test = train_test_split(small_synth, fold_split(i, 4), seed=0)  # type: ignore[arg-type]
        assert train.subjects is not None and test.subjects is not None
        assert not set(train.subjects.tolist()) & set(test.subjects.tolist())
        assert len(train) + len(test) == len(small_synth)
        tested += test.subjects.tolist()
    assert sorted(tested) == sorted(small_synth.subjects.tolist())  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["fold:0/3", "fold:4/3", "fold:1/1", "fold:a/b", "fold:2"])
def test_bad_fold_names_are_user_errors(small_synth: EmotionDataset, kind: str) -> None:
    with pytest.raises(UserError):
        train_test_split(small_synth, kind)  # type: ignore[arg-type]


def test_folds_need_people(small_synth: EmotionDataset) -> None:
    anonymous = EmotionDataset("anon", small_synth.images, small_synth.labels)
    with pytest.raises(UserError, match="subjects.csv"):
        train_test_split(anonymous, fold_split(0, 3))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="people"):
        train_test_split(small_synth, fold_split(0, 13))  # type: ignore[arg-type]


def test_cross_validation_runs_each_fold_and_summarises(
    small_synth: EmotionDataset, tmp_path: Path
) -> None:
    spec = SimSpec("sflv1", 2, 1, seed=0, train=FAST, out_dir=tmp_path)
    m = cross_validate(small_synth, spec, 3)
    assert len(m["folds"]) == 3
    accs = [f["final"]["test_accuracy"] for f in m["folds"]]
    assert m["cv"]["test_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert m["cv"]["test_accuracy_std"] == pytest.approx(np.std(accs))
    assert m["final"]["test_accuracy"] == m["cv"]["test_accuracy_mean"]
    # Every picture is tested exactly once over the folds.
    assert int(np.sum(m["final"]["test_confusion"])) == len(small_synth)
    assert m["data"]["n_test"] == len(small_synth)
    # Each fold is the run `simulate` gives for that fold's split.
    alone = simulate(small_synth, SimSpec("sflv1", 2, 1, seed=0, split="fold:2/3", train=FAST))  # type: ignore[arg-type]
    assert m["folds"][1]["final"]["test_accuracy"] == alone["final"]["test_accuracy"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["cv"] == m["cv"] and len(written["folds"]) == 3
    assert (tmp_path / "fold-3" / "metrics.json").exists()


def test_folds_refuse_another_split(small_synth: EmotionDataset) -> None:
    with pytest.raises(UserError, match="--split random"):
        cross_validate(small_synth, SimSpec("sl", 2, 1, split="random"), 3)


def test_shift_score_is_measured_on_the_model_the_run_tested(small_synth: EmotionDataset) -> None:
    m = simulate(small_synth, SimSpec("centralized", 1, 2, train=FAST, report_shift=True))
    final = m["final"]
    # The hook scores the same model on the same test people as the run's own evaluation.
    assert final["in_domain_accuracy"] == pytest.approx(final["test_accuracy"])
    assert final["shift_gap"] == pytest.approx(
        final["in_domain_accuracy"] - final["shift_accuracy"]
    )
    assert set(final["shift_by_perturbation"]) >= {"blur", "jpeg"}
    assert 0.0 <= final["tta_in_domain_accuracy"] <= 1.0  # test-time averaging beside it
    assert 0.0 <= final["tta_shift_accuracy"] <= 1.0
    assert "shift_accuracy" not in simulate(small_synth, SimSpec("centralized", 1, 1))["final"]


def test_cli_folds_show_mean_and_spread(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["compare", "--algos", "sl", "--clients", "2", "--rounds", "1", "--folds", "2",
         "--synth-identities", "8", "--batch-size", "16", "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "±" in (tmp_path / "results.md").read_text()
    m = json.loads((tmp_path / "sl-2" / "metrics.json").read_text())
    assert set(m["cv"]) >= {"test_accuracy_mean", "test_accuracy_std", "macro_f1_mean"}
    assert "domain-shift proxy" in result.output
    for key in ("shift_accuracy", "tta_in_domain_accuracy", "tta_shift_accuracy"):
        per_fold = [f["final"][key] for f in m["folds"]]
        assert m["final"][key] == pytest.approx(np.mean(per_fold)), key
