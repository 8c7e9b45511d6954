"""U-shaped split: the device keeps the head and the labels, and the arithmetic stays the same.

SL with one client must equal centralized training step for step (the head runs on the device
under the same seed as in the unsplit forward), and no message to the aggregator may carry a
label or a logit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitfed.client import ClientRuntime
from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.errors import UserError
from splitfed.model import ModelConfig, feature_dim
from splitfed.simulate import SimSpec, simulate
from splitfed.wire import MsgType, decode

ROUNDS = 2


def run(ds: EmotionDataset, algo: str, clients: int, shape: str = "standard", **kw: object) -> dict:  # type: ignore[type-arg]
    spec = SimSpec(
        algo,
        clients,
        ROUNDS,
        seed=7,
        train=TrainConfig(batch_size=16),
        model=ModelConfig(widths=(8, 16, 16), cut=1, shape=shape),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    return simulate(ds, spec)


def trajectory(m: dict) -> list[tuple[float, float, float]]:  # type: ignore[type-arg]
    return [(r["train_loss"], r["train_accuracy"], r["test_accuracy"]) for r in m["rounds"]]


@pytest.mark.parametrize("algo", ["sl", "sflv2", "sflv1"])
def test_ushaped_one_client_equals_centralized(small_synth: EmotionDataset, algo: str) -> None:
    central = run(small_synth, "centralized", 1)
    u = run(small_synth, algo, 1, "u")
    np.testing.assert_allclose(trajectory(u), trajectory(central), rtol=0, atol=1e-6)
    assert u["final"]["test_confusion"] == central["final"]["test_confusion"]
    assert central["rounds"][-1]["train_loss"] < central["rounds"][0]["train_loss"]


def test_ushaped_sflv1_equals_sflv1_with_several_clients(small_synth: EmotionDataset) -> None:
    """SFLV1 already gives each client its own copy of the head and averages the copies once a
    round; on the device or on the aggregator, that is the same arithmetic."""
    u = run(small_synth, "sflv1", 3, "u")
    plain = run(small_synth, "sflv1", 3)
    np.testing.assert_allclose(trajectory(u), trajectory(plain), rtol=0, atol=1e-6)
    assert u["final"]["test_confusion"] == plain["final"]["test_confusion"]


def test_ushaped_sflv2_with_several_clients_is_its_own_algorithm(
    small_synth: EmotionDataset,
) -> None:
    """SFLV2's one head steps on every batch; U-shaped, each device steps its own head and the
    heads are averaged once a round. It learns, and it is not the same numbers."""
    u = run(small_synth, "sflv2", 3, "u")
    plain = run(small_synth, "sflv2", 3)
    assert u["rounds"][-1]["train_loss"] < u["rounds"][0]["train_loss"]
    assert trajectory(u) != trajectory(plain)
    assert [r["samples"] for r in u["rounds"]] == [r["samples"] for r in plain["rounds"]]


class Recorder(ClientRuntime):
    """The honest runtime, keeping every message it sends (what the aggregator receives)."""

    sent: list[bytes] = []

    def handle_bytes(self, data: bytes) -> list[bytes]:  # type: ignore[override]
        out = super().handle_bytes(data)
        Recorder.sent.extend(out)
        return out


def test_ushaped_wire_carries_no_labels_and_no_logits(
    small_synth: EmotionDataset, tmp_path: Path
) -> None:
    Recorder.sent = []
    m = run(small_synth, "sflv2", 2, "u", runtime_factory=Recorder, out_dir=tmp_path)
    assert m["final"]["test_accuracy"] > 0
    types = set()
    cfg = ModelConfig(input_shape=small_synth.input_shape, widths=(8, 16, 16), cut=1)
    for raw in Recorder.sent:
        msg = decode(raw)
        types.add(msg.env.type)
        assert "labels" not in msg.tensors
        assert "pred" not in msg.tensors
        for name, t in msg.tensors.items():
            # No tensor has the classes as its last axis but the head's own weights.
            if t.ndim >= 1 and t.shape[-1] == cfg.num_classes and not name.startswith("h."):
                raise AssertionError(f"{msg.env.type.value}: {name} {t.shape} looks like logits")
    assert {MsgType.SMASHED, MsgType.FEATURE_GRADS, MsgType.CLIENT_UPDATE} <= types
    grads = [decode(r) for r in Recorder.sent if decode(r).env.type is MsgType.FEATURE_GRADS]
    assert grads[0].tensors["grad"].shape[1] == feature_dim(cfg)


@pytest.mark.parametrize("algo", ["fedavg", "centralized", "pyvertical"])
def test_ushape_with_an_algorithm_without_it_is_a_user_error(
    small_synth: EmotionDataset, algo: str
) -> None:
    with pytest.raises(UserError, match="--shape u"):
        run(small_synth, algo, 2, "u")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["simulate", "--algo", "fedavg", "--shape", "u"], "--shape u"),
        (["simulate", "--algo", "centralized", "--shape", "u"], "--shape u"),
        (["simulate", "--algo", "fedavg", "--defence", "noise-1"], "--defence"),
        (["serve", "--algo", "fedavg", "--shape", "u"], "--shape u"),
        (["serve", "--algo", "fedsl", "--defence", "noise-1"], "--defence"),
    ],
)
def test_cli_refuses_shape_and_defence_without_smashed_data(
    command: list[str], message: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from aggregator.cli import main

    args = [*command, "--rounds", "1", "--out", str(tmp_path)]
    if command[0] == "simulate":
        args += ["--synth-identities", "8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_cli_simulate_runs_ushaped_and_defended(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from aggregator.cli import main

    args = ["simulate", "--algo", "sl", "--clients", "2", "--rounds", "1", "--batch-size", "16"]
    args += ["--synth-identities", "8", "--shape", "u", "--defence", "noise-1-int8"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["model"]["shape"] == "u"
    assert m["defence"]["noise"] == 1.0 and m["train"]["compression"] == "int8"
