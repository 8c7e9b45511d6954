"""`aggregator privacy-report` on U-shaped checkpoints (of `simulate` and of `serve`), and the
one-line errors of the inputs it, simulate and serve cannot take."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.cli import main
from tests.mqtt.fed import Mosquitto

SMALL = ["--synth-identities", "8", "--rounds", "1", "--batch-size", "16", "--no-shift"]
WEAK = ["--attack-epochs", "1", "--attack-width", "4", "--inversion-steps", "2"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _one_line_error(code: int, text: str, needle: str) -> None:
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], text
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def u_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("u-run")
    code, text = invoke("simulate", "--algo", "sflv1", "--clients", "2", "--shape", "u",
                        "--defence", "none", *SMALL, "--out", str(out))  # fmt: skip
    assert code == 0, text
    return out


def _report_says_no_labels(run: Path, out: Path, identities: int) -> dict:  # type: ignore[type-arg]
    code, text = invoke("privacy-report", "--checkpoint", str(run), "--synth-identities",
                        str(identities), "--defence", "none", *WEAK, "--out", str(out))  # fmt: skip
    assert code == 0, text
    report = json.loads((out / "privacy.json").read_text())
    seen = report["without_attack"]
    assert seen["shape"] == "u", seen
    assert seen["labels_on_wire"] is False and seen["logits_on_wire"] is False, seen
    assert "labels on the wire no" in text
    (none,) = report["settings"]
    assert none["name"] == "none" and none["accuracy_from"] == "checkpoint"  # nothing retrained
    assert -1.0 <= none["ssim"] <= 1.0 and none["bytes_per_sample"] > 0
    return report


def test_report_on_a_simulated_u_checkpoint(u_run: Path, tmp_path: Path) -> None:
    report = _report_says_no_labels(u_run, tmp_path, 8)
    metrics = json.loads((u_run / "metrics.json").read_text())
    assert report["settings"][0]["test_accuracy"] == metrics["final"]["test_accuracy"]


@pytest.mark.mqtt
def test_report_on_a_served_u_checkpoint(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """`serve --shape u` over Mosquitto with one in-process agent, one round, then the report."""
    from aggregator.serve import run_serve
    from aggregator.serve_config import ServeBroker, ServeConfig
    from edge_agent.agent import Agent
    from splitfed.client import ClientRuntime
    from splitfed.data.partition import client_shards
    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.model import ModelConfig
    from splitfed.mqtt import LinkSettings

    run_id, stop = "u-report", threading.Event()
    cfg = ServeConfig(algo="sflv1", min_clients=1, rounds=1, round_timeout=120, join_timeout=120,
                      model=ModelConfig(shape="u"), defence="none", out=tmp_path / "serve",
                      broker=ServeBroker(url=mosquitto.url, run_id=run_id))  # fmt: skip
    server = threading.Thread(target=run_serve, args=(cfg,), kwargs={"stop": stop, "live": False},
                              daemon=True)  # fmt: skip
    _, _, shards = client_shards(generate_synth(SynthConfig(identities=8)), 1, None, None, 0)
    agent = Agent(ClientRuntime("client-00", run_id, *shards[0]),
                  LinkSettings.from_url(mosquitto.url), "splitfed", run_id, stop)  # fmt: skip
    server.start()
    agent.start()
    threading.Thread(target=agent.run, daemon=True).start()
    try:
        server.join(240)
        assert not server.is_alive(), "serve did not finish its round"
    finally:
        stop.set()
        agent.close()
    metrics = json.loads((cfg.out / "metrics.json").read_text())
    assert metrics["model"]["shape"] == "u" and len(metrics["rounds"]) == 1
    _report_says_no_labels(cfg.out, tmp_path / "report", 8)


def test_a_defence_the_u_checkpoint_was_not_trained_with(u_run: Path, tmp_path: Path) -> None:
    code, text = invoke("privacy-report", "--checkpoint", str(u_run), "--synth-identities", "8",
                        "--defence", "noise-1", "--no-train", *WEAK,
                        "--out", str(tmp_path))  # fmt: skip
    _one_line_error(code, text, "is not what")
    assert not (tmp_path / "privacy.json").exists()


def test_too_few_people_for_a_disjoint_split_u(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, text = invoke("simulate", "--algo", "sl", "--clients", "2", "--shape", "u",
                        "--defence", "none", "--synth-identities", "3", "--rounds", "1",
                        "--no-shift", "--out", str(run))  # fmt: skip
    assert code == 0, text
    code, text = invoke("privacy-report", "--checkpoint", str(run), "--synth-identities", "3",
                        "--defence", "none", "--out", str(tmp_path / "report"))  # fmt: skip
    _one_line_error(code, text, "too few people")


@pytest.mark.parametrize("algo", ["fedavg", "centralized", "fedsl", "pyvertical"])
def test_shape_u_with_an_algorithm_without_smashed_data(algo: str, tmp_path: Path) -> None:
    code, text = invoke("simulate", "--algo", algo, "--shape", "u", *SMALL,
                        "--out", str(tmp_path))  # fmt: skip
    _one_line_error(code, text, "--shape u")
    assert "sl, sflv1, sflv2" in text
    assert not (tmp_path / "metrics.json").exists()


def test_serve_shape_u_with_an_algorithm_without_smashed_data(tmp_path: Path) -> None:
    code, text = invoke("serve", "--algo", "fedavg", "--shape", "u", "--out", str(tmp_path),
                        "--join-timeout", "1")  # fmt: skip
    _one_line_error(code, text, "--shape u")
