"""U-shaped split and defences over a real Mosquitto: the same numbers, nothing labelled leaks.

A U-shaped SFLV1 run of `aggregator serve` with three `edge-agent` processes equals
`aggregator simulate` of the same run exactly, and a tap on `#` sees no label and no logit in
any message: the devices keep the head and the labels. A run with activation noise completes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from splitfed.client import CLIENT_PREFIX, HEAD_PREFIX
from splitfed.config import TrainConfig
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig, feature_dim, smashed_shape
from splitfed.mqtt import STATUS, parse_topic
from splitfed.simulate import SimSpec, simulate
from splitfed.wire import MsgType, decode

from .fed import IDENTITIES, THREADS, Mosquitto, Procs, Tap, agent_cmd, read_metrics, serve_cmd
from .test_e2e import assert_equal_metrics

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

CLIENTS, ROUNDS = 3, 2


def federate(
    procs: Procs, out: Path, url: str, algo: str, run_id: str, clients: int, *extra: str
) -> dict[str, Any]:
    """serve + `clients` agents as separate processes; returns serve's metrics.json."""
    procs.start(
        "aggregator",
        serve_cmd(out, url, algo, clients, ROUNDS, run_id, "--round-timeout", "120", *extra),
    )
    for i in range(clients):
        procs.start(f"client-{i:02d}", agent_cmd(url, i, clients, run_id))
    assert procs.wait("aggregator", 300) == 0, procs.logs()
    for i in range(clients):
        assert procs.wait(f"client-{i:02d}", 60) == 0, procs.logs()
    return read_metrics(out)


def simulated(algo: str, model: ModelConfig) -> dict[str, Any]:
    """The same run in-process, with the threads every process of the MQTT run uses."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        ds = generate_synth(SynthConfig(identities=IDENTITIES))
        return simulate(
            ds, SimSpec(algo, CLIENTS, ROUNDS, seed=0, model=model, train=TrainConfig())
        )
    finally:
        torch.set_num_threads(old)


def wire_problems(messages: list[tuple[str, bytes, bool, float]], run_id: str) -> list[str]:
    """What a U-shaped run must never show: labels, predictions or logit-shaped tensors."""
    model = ModelConfig()
    problems: list[str] = []
    for name, payload, _, _ in messages:
        parsed = parse_topic("splitfed", run_id, name)
        if parsed is None or parsed[1] == STATUS or not payload:
            continue
        msg = decode(payload)
        typ = msg.env.type
        for k, a in msg.tensors.items():
            if k in ("labels", "pred", "probs"):
                problems.append(f"{typ.value}: a {k!r} tensor")
            elif a.ndim >= 1 and a.shape[-1] == model.num_classes and not k.startswith(HEAD_PREFIX):
                problems.append(f"{typ.value}: {k} {a.shape} is shaped like logits")
        if typ is MsgType.SMASHED and set(msg.tensors) != {"activations"}:
            problems.append(f"smashed carries {sorted(msg.tensors)}")
        if typ is MsgType.SMASHED and msg.tensors["activations"].shape[1:] != smashed_shape(model):
            problems.append("smashed of the wrong shape")
        if typ in (MsgType.FEATURES, MsgType.FEATURE_GRADS):
            (t,) = msg.tensors.values()
            if t.shape[1:] != (feature_dim(model),):
                problems.append(f"{typ.value}: {t.shape}, expected features")
        if typ is MsgType.CLIENT_UPDATE:
            names = {k.split(".", 1)[0] + "." for k in msg.tensors}
            if names != {CLIENT_PREFIX, HEAD_PREFIX}:
                problems.append(f"client_update carries {sorted(names)}")
            if set(msg.env.body) & {"labels", "class_counts_round"}:
                problems.append("client_update body with labels")
    return problems


def test_ushaped_sflv1_over_mosquitto_equals_simulate_and_keeps_labels_home(
    mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    run_id = "ushape-sflv1"
    tap = Tap(mosquitto.url)
    try:
        metrics = federate(
            procs, tmp_path / "out", mosquitto.url, "sflv1", run_id, CLIENTS, "--shape", "u"
        )
    finally:
        tap.close()
    assert metrics["model"]["shape"] == "u"
    assert_equal_metrics(metrics, simulated("sflv1", ModelConfig(shape="u")))
    assert metrics["comm"]["rejected_messages"] == 0 and metrics["comm"]["transport_dropped"] == 0
    messages = tap.snapshot()
    assert not (problems := wire_problems(messages, run_id)), "\n".join(problems[:20])
    types = [decode(p).env.type for n, p, _, _ in messages if not n.endswith("/status") and p]
    n_smashed = types.count(MsgType.SMASHED)
    assert n_smashed > 0
    # Every training batch made the round trip through the device's head.
    assert types.count(MsgType.FEATURE_GRADS) == types.count(MsgType.GRADIENTS)
    assert types.count(MsgType.FEATURES) == (
        types.count(MsgType.FEATURE_GRADS) + types.count(MsgType.EVAL_SMASHED)
    )
    assert MsgType.EVAL_PREDICTIONS not in types


def test_noise_defence_over_mosquitto_completes(
    mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    run_id = "defence-noise"
    tap = Tap(mosquitto.url)
    try:
        metrics = federate(
            procs, tmp_path / "out", mosquitto.url, "sflv1", run_id, 2, "--defence", "noise-1"
        )
    finally:
        tap.close()
    assert metrics["defence"]["noise"] == 1.0
    assert metrics["comm"]["rejected_messages"] == 0
    assert all(r["samples"] > 0 for r in metrics["rounds"])
    assert np.isfinite([r["train_loss"] for r in metrics["rounds"]]).all()
    smashed = [decode(p) for n, p, _, _ in tap.snapshot() if n.endswith("/up") and p]
    assert any(m.env.type is MsgType.SMASHED for m in smashed)
