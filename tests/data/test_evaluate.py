"""`aggregator evaluate` and `aggregator predict` on real checkpoints, real photos and eye crops."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from aggregator.cli import main
from splitfed.algorithms.centralized import Centralized
from splitfed.checkpoint import save_checkpoint
from splitfed.config import TrainConfig
from splitfed.emotions import EMOTIONS
from splitfed.metrics import evaluation_report
from splitfed.model import ModelConfig

from .conftest import require_face_model


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.output


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITFED_CACHE", str(tmp_path / "cache"))


def biased_checkpoint(directory: Path, emotion: str) -> Path:
    """A real checkpoint (as simulate and serve write it) whose model always says `emotion`."""
    algo = Centralized(ModelConfig(), TrainConfig(), 0)
    with torch.no_grad():
        algo.server_net.fc.weight.zero_()
        algo.server_net.fc.bias.fill_(-5.0)
        algo.server_net.fc.bias[EMOTIONS.index(emotion)] = 5.0
    save_checkpoint(directory, algo, {"round": 0})
    return directory


def crop_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """A folder-per-class set of ready 48x96 eye crops (they load without face detection)."""
    rng = np.random.default_rng(seed)
    for emotion, n in counts.items():
        (root / emotion).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            crop = rng.integers(0, 256, (48, 96), dtype=np.uint8)
            assert cv2.imwrite(str(root / emotion / f"{i}.png"), crop)
    return root


def test_report_leaves_absent_classes_unscored() -> None:
    conf = np.zeros((7, 7), dtype=np.int64)
    conf[3, 3], conf[4, 3], conf[4, 4] = 3, 1, 1  # happy 3/3, neutral 1/2
    r = evaluation_report(conf)
    assert r["n"] == 5 and r["accuracy"] == pytest.approx(0.8)
    assert r["per_class"]["happy"]["recall"] == 1.0
    assert r["per_class"]["neutral"]["recall"] == 0.5
    assert r["absent_classes"] == ["afraid", "angry", "disgusted", "sad", "surprised"]
    assert all(r["per_class"][e]["recall"] is None for e in r["absent_classes"])
    f1_happy, f1_neutral = 2 * 3 / (6 + 1), 2 * 1 / (2 + 1)
    assert r["macro_f1"] == pytest.approx((f1_happy + f1_neutral) / 2)


def test_evaluate_scores_each_data_set(tmp_path: Path) -> None:
    ckpt = biased_checkpoint(tmp_path / "ckpt", "happy")
    a = crop_folder(tmp_path / "setA", {"happy": 3, "neutral": 2})
    b = crop_folder(tmp_path / "setB", {"happy": 1, "sad": 3}, seed=1)
    out = tmp_path / "eval"
    code, _, output = invoke(
        "evaluate", "--checkpoint", str(ckpt), "--data", str(a), "--data", str(b),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    ra = json.loads((out / "setA" / "evaluation.json").read_text())
    rb = json.loads((out / "setB" / "evaluation.json").read_text())
    for key in ("n", "accuracy", "macro_f1", "per_class", "confusion"):
        assert key in ra
    assert ra["n"] == 5 and ra["accuracy"] == pytest.approx(0.6)
    assert ra["per_class"]["happy"]["recall"] == 1.0 and ra["per_class"]["neutral"]["recall"] == 0
    assert ra["per_class"]["sad"] == {**ra["per_class"]["sad"], "recall": None, "absent": True}
    assert ra["confusion"][EMOTIONS.index("neutral")][EMOTIONS.index("happy")] == 2
    assert rb["n"] == 4 and rb["accuracy"] == pytest.approx(0.25)
    assert "neutral" in rb["absent_classes"] and "sad" not in rb["absent_classes"]
    for sub in ("setA", "setB"):
        assert (out / sub / "confusion.png").stat().st_size > 1000
    assert ra["data"]["trained_on"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert [s["n"] for s in summary["sets"]] == [5, 4]
    assert "recall sad" in output


def test_evaluate_a_simulated_run(tmp_path: Path) -> None:
    """The run folder simulate writes is accepted as it is; synth is scored in full."""
    run = tmp_path / "run"
    code, _, output = invoke(
        "simulate", "--algo", "sflv1", "--clients", "2", "--rounds", "1",
        "--synth-identities", "8", "--out", str(run),
    )  # fmt: skip
    assert code == 0, output
    code, _, output = invoke(
        "evaluate", "--checkpoint", str(run), "--data", "synth", "--out", str(tmp_path / "ev")
    )
    assert code == 0, output
    r = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert r["n"] == sum(map(sum, r["confusion"])) > 0 and r["absent_classes"] == []
    assert 0.0 <= r["accuracy"] <= 1.0
    assert r["data"]["trained_on"] is True and "includes its training pictures" in output
    code, _, output = invoke(  # the checkpoint folder itself, as serve --checkpoint-dir holds it
        "evaluate", "--checkpoint", str(run / "checkpoint"), "--data", "synth",
        "--out", str(tmp_path / "ev2"),
    )  # fmt: skip
    assert code == 0, output
    again = json.loads((tmp_path / "ev2" / "evaluation.json").read_text())
    assert again["confusion"] == r["confusion"] and again["data"]["trained_on"] is True


def test_evaluate_rejects_crops_of_another_size(tmp_path: Path) -> None:
    algo = Centralized(ModelConfig(input_shape=(1, 32, 64)), TrainConfig(), 0)
    save_checkpoint(tmp_path / "ckpt", algo, {"round": 0})
    code, _, output = invoke(
        "evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", "synth",
        "--out", str(tmp_path / "ev"),
    )  # fmt: skip
    assert code == 2 and "the model takes (1, 32, 64)" in output


def test_missing_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    code, _, output = invoke(
        "evaluate", "--checkpoint", str(tmp_path / "nothing"), "--data", "synth"
    )
    assert code == 2 and output.startswith("error: no checkpoint at")


@pytest.fixture
def photo_folder(tmp_path: Path, astronaut_bgr: np.ndarray, grace_bgr: np.ndarray) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    assert cv2.imwrite(str(root / "astronaut.png"), astronaut_bgr)
    assert cv2.imwrite(str(root / "grace_hopper.jpg"), grace_bgr)
    assert cv2.imwrite(str(root / "wall.png"), np.full((360, 480, 3), 140, np.uint8))
    (root / "notes.txt").write_text("not a photo\n")
    return root


@pytest.mark.parametrize("tta", [(), ("--tta",)])
def test_predict_folder_as_json(tmp_path: Path, photo_folder: Path, tta: tuple[str, ...]) -> None:
    require_face_model()
    ckpt = biased_checkpoint(tmp_path / "ckpt", "surprised")
    code, stdout, output = invoke(
        "predict", "--checkpoint", str(ckpt), str(photo_folder), "--json", *tta
    )
    assert code == 0, output
    rows = {Path(r["file"]).name: r for r in map(json.loads, stdout.splitlines())}
    assert set(rows) == {"astronaut.png", "grace_hopper.jpg", "wall.png"}
    assert rows["wall.png"]["face"] is False and "emotion" not in rows["wall.png"]
    for name in ("astronaut.png", "grace_hopper.jpg"):
        r = rows[name]
        assert r["face"] is True and r["emotion"] == "surprised"
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        x, y, w, h = r["box"]
        (lx, ly), (rx, ry) = r["eyes"]
        assert x < lx < rx < x + w and y < ly < y + h and y < ry < y + h
        band = np.array(r["band"])
        assert band.shape == (4, 2)
        assert band[:, 1].min() < min(ly, ry) < band[:, 1].max()  # the eyes lie in the band


def test_predict_says_when_there_is_no_face(tmp_path: Path, photo_folder: Path) -> None:
    ckpt = biased_checkpoint(tmp_path / "ckpt", "happy")
    code, stdout, output = invoke(
        "predict", "--checkpoint", str(ckpt), str(photo_folder / "wall.png")
    )
    assert code == 0, output
    assert stdout.strip().endswith("wall.png: no face found")


def test_predict_annotates_the_frame(tmp_path: Path, photo_folder: Path) -> None:
    require_face_model()
    ckpt = biased_checkpoint(tmp_path / "ckpt", "happy")
    ann = tmp_path / "ann"
    code, stdout, output = invoke(
        "predict", "--checkpoint", str(ckpt), str(photo_folder / "grace_hopper.jpg"),
        "--annotate", str(ann),
    )  # fmt: skip
    assert code == 0, output
    assert "grace_hopper.jpg: happy" in stdout
    original = cv2.imread(str(photo_folder / "grace_hopper.jpg"))
    drawn = cv2.imread(str(ann / "grace_hopper.jpg"))
    assert drawn is not None and drawn.shape == original.shape
    changed = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2) > 60
    assert changed.sum() > 500  # the box, band and label, not JPEG noise
    green = (drawn[..., 1] > 150) & (drawn[..., 0] < 80) & (drawn[..., 2] < 80)
    assert green.sum() > 200  # the face box


def test_test_only_reproduces_the_runs_held_out_score(tmp_path: Path, fer_folder: Path) -> None:
    """simulate keeps FER2013's own split; evaluate --test-only scores that same test side."""
    run = tmp_path / "run"
    code, _, output = invoke(
        "simulate", "--algo", "centralized", "--rounds", "2", "--batch-size", "4",
        "--data", str(fer_folder), "--out", str(run),
    )  # fmt: skip
    assert code == 0, output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["split"] == "predefined"
    assert (metrics["data"]["n_train"], metrics["data"]["n_test"]) == (10, 4)
    out = tmp_path / "ev"
    code, _, output = invoke(
        "evaluate", "--checkpoint", str(run), "--data", str(fer_folder), "--test-only",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    r = json.loads((out / "evaluation.json").read_text())
    assert r["n"] == 4 and r["data"]["part"].startswith("test side of the predefined split")
    assert r["accuracy"] == pytest.approx(metrics["final"]["test_accuracy"])
    assert r["macro_f1"] is not None and set(r["absent_classes"]) == {
        "afraid", "neutral", "sad", "surprised",
    }  # fmt: skip
    assert r["tta"] is False
    # With test-time averaging, the number the simulator reported beside the plain one.
    code, _, output = invoke(
        "evaluate", "--checkpoint", str(run), "--data", str(fer_folder), "--test-only", "--tta",
        "--out", str(tmp_path / "ev_tta"),
    )  # fmt: skip
    assert code == 0, output
    r = json.loads((tmp_path / "ev_tta" / "evaluation.json").read_text())
    assert r["tta"] is True and r["n"] == 4
    assert r["accuracy"] == pytest.approx(metrics["final"]["tta_in_domain_accuracy"])
