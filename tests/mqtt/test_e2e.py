"""End to end: `aggregator serve` and three `edge-agent` processes train through a real broker.

With fp32 the metrics equal `aggregator simulate`'s for the same seed and split, number for
number: the agents run the simulator's ClientRuntime and the aggregator its algorithms, and
only the transport differs. Compressed activations reproduce the simulator run with the same
compression exactly and stay within a stated tolerance of fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from splitfed.config import TrainConfig
from splitfed.model import ModelConfig

from .fed import (
    Mosquitto,
    Procs,
    Tap,
    agent_cmd,
    check_payloads,
    free_port,
    parts_trained,
    read_metrics,
    retained_topics,
    serve_cmd,
    wait_port,
)

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

ROUND_FIELDS = ("train_loss", "train_accuracy", "test_accuracy", "test_macro_f1", "samples",
                "clients", "dropped")  # fmt: skip
FINAL_FIELDS = ("train_accuracy", "test_accuracy", "macro_f1", "test_confusion")
# Compressed activations against fp32 (3 clients x 2 rounds of small synth, 84 held-out
# pictures): the simulator differed by <= 1.4 % in train loss and <= 4 pictures in accuracy.
# The bounds leave room for that and still catch a broken (de)quantization, which moves the
# loss by far more or makes it NaN.
LOSS_REL_TOLERANCE = 0.05
ACCURACY_TOLERANCE = 0.10


def federate(
    procs: Procs,
    out: Path,
    url: str,
    algo: str,
    run_id: str,
    embedded: bool = False,
    compression: str = "fp32",
    clients: int = 3,
    rounds: int = 2,
    serve_args: tuple[str, ...] = (),
    default_defence: bool = False,
) -> dict[str, Any]:
    """Run serve + `clients` agents as separate processes; returns serve's metrics.json.

    `--defence none` unless `serve_args` names one or `default_defence` leaves serve its own."""
    extra = ["--compression", compression, "--round-timeout", "120", *serve_args]
    broker = None if embedded else url
    if embedded:
        extra += ["--listen", url.removeprefix("mqtt://")]
    cmd = serve_cmd(out, broker, algo, clients, rounds, run_id, *extra,
                    default_defence=default_defence)  # fmt: skip
    procs.start("aggregator", cmd)
    if embedded:
        assert wait_port(int(url.rsplit(":", 1)[1]), 60), procs.logs()
    for i in range(clients):
        procs.start(f"client-{i:02d}", agent_cmd(url, i, clients, run_id))
    assert procs.wait("aggregator", 300) == 0, procs.logs()
    for i in range(clients):  # --exit-when-done: they leave when the aggregator stops
        assert procs.wait(f"client-{i:02d}", 60) == 0, procs.logs()
    return read_metrics(out)


def assert_equal_metrics(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert len(got["rounds"]) == len(ref["rounds"])
    for r, (a, b) in enumerate(zip(got["rounds"], ref["rounds"], strict=True)):
        for f in ROUND_FIELDS:
            assert a[f] == b[f], f"round {r + 1} {f}: MQTT {a[f]!r} != simulate {b[f]!r}"
    for f in FINAL_FIELDS:
        assert got["final"][f] == ref["final"][f], (
            f"final {f}: {got['final'][f]} != {ref['final'][f]}"
        )


def assert_close_metrics(got: dict[str, Any], ref: dict[str, Any]) -> None:
    for r, (a, b) in enumerate(zip(got["rounds"], ref["rounds"], strict=True)):
        assert abs(a["train_loss"] - b["train_loss"]) <= LOSS_REL_TOLERANCE * b["train_loss"], (
            f"round {r + 1} loss {a['train_loss']} vs fp32 {b['train_loss']}"
        )
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= ACCURACY_TOLERANCE, (
            f"round {r + 1} acc"
        )
    assert abs(got["final"]["test_accuracy"] - ref["final"]["test_accuracy"]) <= ACCURACY_TOLERANCE


def assert_clean_wire(
    tap: Tap, url: str, run_id: str, compression: str, metrics: dict[str, Any], local: bool = False
) -> None:
    """Only the declared messages crossed; with `local` (FedAvg) only weights travelled."""
    problems, seen = check_payloads(tap.snapshot(), "splitfed", run_id, compression, full=local)
    assert not problems, "\n".join(problems[:20])
    # 2 rounds, every part each device has batches in (fewer than parts: it sits out the rest)
    assert len(metrics["rounds"]) == 2 and metrics["train"]["syncs_per_round"] > 1
    starts = 2 * sum(parts_trained(metrics))
    assert seen["round_start"] == starts and seen["client_update"] == starts, seen
    retained = retained_topics(url)
    assert all(t.endswith(("/status", "/global")) for t in retained), sorted(retained)
    if local:  # whole models train on the devices: no activation, no gradient, nothing published
        assert seen["smashed"] == seen["gradients"] == seen["eval_smashed"] == 0, seen
        assert seen["global_weights"] == 0, seen
        assert all(t.endswith("/status") for t in retained), sorted(retained)
        return
    assert seen["smashed"] > 0 and seen["gradients"] == seen["smashed"], seen
    assert seen["global_weights"] >= 2, seen
    assert f"splitfed/{run_id}/aggregator/global" in retained


@pytest.mark.parametrize("algo", ["sflv1", "sflv2", "sl", "fedavg"])
def test_fp32_over_mosquitto_equals_simulate(
    algo: str, mosquitto: Mosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    run_id = f"e2e-{algo}"
    tap = Tap(mosquitto.url)
    try:
        metrics = federate(procs, tmp_path / "out", mosquitto.url, algo, run_id)
    finally:
        tap.close()
    assert_equal_metrics(metrics, reference(algo))
    assert metrics["comm"]["rejected_messages"] == 0 and metrics["comm"]["transport_dropped"] == 0
    assert_clean_wire(tap, mosquitto.url, run_id, "fp32", metrics, local=algo == "fedavg")
    assert (tmp_path / "out" / "curves.png").exists() and (tmp_path / "out" / "checkpoint").is_dir()


def test_pretrained_start_over_mosquitto_equals_simulate(
    mosquitto: Mosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    """`serve --init-from` starts where `simulate --init-from` starts, and ends where it ends.

    The checkpoint is anti-aliased (`ModelConfig.antialias`, which has no weights): serve takes
    the setting from it and the agents from the round's model, so the blur runs on every
    device as in the simulator, or the numbers would differ."""
    import torch

    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.simulate import SimSpec, simulate

    from .conftest import IDENTITIES, THREADS

    ckpt = tmp_path / "pretrained" / "checkpoint"
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        ds = generate_synth(SynthConfig(identities=IDENTITIES))
        blurred = ModelConfig(antialias=True)
        simulate(ds, SimSpec("centralized", 1, 2, seed=5, out_dir=ckpt.parent, model=blurred))
        ref = simulate(
            ds, SimSpec("sflv1", 3, 2, seed=0, model=blurred, train=TrainConfig(), init_from=ckpt)
        )
    finally:
        torch.set_num_threads(old)
    got = federate(procs, tmp_path / "out", mosquitto.url, "sflv1", "e2e-pretrained",
                   serve_args=("--init-from", str(ckpt)))  # fmt: skip
    assert_equal_metrics(got, ref)
    assert got["model"]["antialias"] is True
    assert got["rounds"][0]["train_loss"] != reference("sflv1")["rounds"][0]["train_loss"]


@pytest.mark.parametrize("algo", ["sflv1", "sflv2"])
def test_cut_rounds_over_mosquitto_equal_simulate(
    algo: str, mosquitto: Mosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    """`--syncs-per-round 2`: each round is two parts with an average after each; the wire's
    round numbers count the parts, and the run is the simulator's, number for number."""
    import torch

    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.simulate import SimSpec, simulate

    from .conftest import IDENTITIES, THREADS

    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        ds = generate_synth(SynthConfig(identities=IDENTITIES))
        ref = simulate(ds, SimSpec(algo, 3, 2, seed=0, train=TrainConfig(syncs_per_round=2)))
    finally:
        torch.set_num_threads(old)
    got = federate(procs, tmp_path / "out", mosquitto.url, algo, f"e2e-cut-{algo}",
                   serve_args=("--syncs-per-round", "2"))  # fmt: skip
    assert_equal_metrics(got, ref)
    assert got["comm"]["rejected_messages"] == 0
    assert got["rounds"][0]["train_loss"] != reference(algo)["rounds"][0]["train_loss"]


def test_int8_activations_over_mosquitto(
    mosquitto: Mosquitto, procs: Procs, reference: Any, tmp_path: Path
) -> None:
    run_id = "e2e-sflv1-int8"
    tap = Tap(mosquitto.url)
    try:
        metrics = federate(
            procs, tmp_path / "out", mosquitto.url, "sflv1", run_id, compression="int8"
        )
    finally:
        tap.close()
    assert_equal_metrics(metrics, reference("sflv1", "int8"))
    assert_close_metrics(metrics, reference("sflv1"))
    assert_clean_wire(tap, mosquitto.url, run_id, "int8", metrics)


def test_embedded_broker_default(procs: Procs, reference: Any, tmp_path: Path) -> None:
    """No --broker: serve starts its own (amqtt, MQTT 3.1.1) broker; the agents fall back to it.

    It runs SFLV2 with fp16 activations: equal to the simulator with fp16, close to fp32.
    """
    url = f"mqtt://127.0.0.1:{free_port()}"
    metrics = federate(procs, tmp_path / "out", url, "sflv2", "e2e-embedded", embedded=True,
                       compression="fp16")  # fmt: skip
    assert_equal_metrics(metrics, reference("sflv2", "fp16"))
    assert_close_metrics(metrics, reference("sflv2"))
    assert metrics["mqtt"]["embedded"] is True
    assert "embedded MQTT broker" in procs.log("aggregator")
    assert "MQTT 3.1.1" in procs.log("client-00")


def test_default_defence_over_mosquitto(mosquitto: Mosquitto, procs: Procs, tmp_path: Path) -> None:
    """No --defence: serve applies `recommended` to sflv1, number for number as simulate does.

    The noise is keyed by each device's secret, which the aggregator never learns; the agents
    here are in-process with the simulator's secrets (`device_secret`), so that the equality
    can hold with the noise on. Everything else is the real serve process and a real broker.
    """
    import threading

    import torch

    from edge_agent.agent import Agent
    from splitfed.client import ClientRuntime
    from splitfed.data.dataset import default_split
    from splitfed.data.partition import client_shards, default_partition
    from splitfed.data.synth import SynthConfig, generate_synth
    from splitfed.defences import DEFENCES
    from splitfed.mqtt import LinkSettings
    from splitfed.simulate import SimSpec, client_id, device_secret, simulate

    from .conftest import IDENTITIES, THREADS

    rec, run_id, clients = DEFENCES["recommended"], "e2e-default", 3
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    stop = threading.Event()
    agents: list[Agent] = []
    try:
        ds = generate_synth(SynthConfig(identities=IDENTITIES))
        spec = SimSpec("sflv1", clients, 2, seed=0, train=TrainConfig(), defence=rec)
        ref = simulate(ds, spec)
        procs.start("aggregator", serve_cmd(tmp_path / "out", mosquitto.url, "sflv1", clients,
                                            2, run_id, "--round-timeout", "120",
                                            default_defence=True))  # fmt: skip
        _, _, shards = client_shards(ds, clients, default_partition(ds), default_split(ds), 0)
        for i, (tr, te) in enumerate(shards):
            runtime = ClientRuntime(client_id(i), run_id, tr, te, secret=device_secret(0, i))
            agent = Agent(runtime, LinkSettings.from_url(mosquitto.url), "splitfed", run_id, stop)
            agent.start()
            threading.Thread(target=agent.run, daemon=True).start()
            agents.append(agent)
        assert procs.wait("aggregator", 300) == 0, procs.logs()
    finally:
        stop.set()
        for agent in agents:
            agent.close()
        torch.set_num_threads(old)
    got = read_metrics(tmp_path / "out")
    assert got["defence"] == rec.model_dump(mode="json") == ref["defence"]
    assert got["model"] == ref["model"]
    assert got["train"]["compression"] == ref["train"]["compression"]
    assert_equal_metrics(got, ref)
