"""Live frames leave the device as the run's defence allows, and a U-shaped run's answers
carry no logits: `aggregator serve --checkpoint C --live` over a real Mosquitto, and an
in-process edge agent whose PREDICT payloads a tap on `#` reads back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aggregator.serve import run_serve
from aggregator.serve_config import ServeBroker, ServeConfig
from edge_agent.agent import Agent, Prediction
from splitfed.checkpoint import load_model
from splitfed.client import ClientRuntime
from splitfed.data.batches import to_tensor
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig
from splitfed.mqtt import LinkSettings
from splitfed.simulate import SimSpec, simulate
from splitfed.wire import MsgType, decode, unpack_activations

from .fed import Mosquitto, Tap

pytestmark = [pytest.mark.mqtt]

FRAMES = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-round SFLV1 checkpoints: a standard split and a U-shaped one."""
    ds = generate_synth(SynthConfig(identities=4))
    out: dict[str, Path] = {}
    for shape in ("standard", "u"):
        d = tmp_path_factory.mktemp(f"ckpt-{shape}")
        model = ModelConfig(input_shape=ds.input_shape, shape=shape)
        simulate(ds, SimSpec("sflv1", 1, 1, model=model, out_dir=d))
        out[shape] = d / "checkpoint"
    return out


class Live:
    """`serve --checkpoint --live` in a thread and one camera-less agent, both on Mosquitto."""

    def __init__(self, url: str, run_id: str, ckpt: Path, defence: str, out: Path) -> None:
        self.stop = threading.Event()
        self.tap = Tap(url)
        cfg = ServeConfig(algo="sflv1", live_model=ckpt, defence=defence, out=out,
                          broker=ServeBroker(url=url, run_id=run_id))  # fmt: skip
        kwargs = {"stop": self.stop, "live": False}
        self.server = threading.Thread(target=run_serve, args=(cfg,), kwargs=kwargs, daemon=True)
        none = generate_synth(SynthConfig(identities=2)).subset(np.zeros(0, np.int64))
        self.runtime = ClientRuntime("cam-01", run_id, none, None)  # a camera, no data
        self.answers: list[Prediction] = []
        self.agent = Agent(self.runtime, LinkSettings.from_url(url), "splitfed", run_id,
                           self.stop, on_prediction=self.answers.append)  # fmt: skip
        self.server.start()
        self.agent.start()
        threading.Thread(target=self.agent.run, daemon=True).start()

    def wait(self, what: Any, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "timed out"
            assert self.server.is_alive(), "the aggregator stopped"
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.agent.close()
        self.server.join(30)
        self.tap.close()

    def sent(self, typ: MsgType, topic_end: str) -> list[Any]:
        return [decode(p) for n, p, _, _ in self.tap.snapshot()
                if n.endswith(topic_end) and p and decode(p).type is typ]  # fmt: skip


@pytest.fixture
def crops() -> np.ndarray:
    """Normalised eye crops, as the live pipeline hands them to the client half."""
    ds = generate_synth(SynthConfig(identities=2))
    return to_tensor(ds.images[:FRAMES]).numpy()


@contextmanager
def _live(mosquitto: Mosquitto, run_id: str, ckpt: Path, defence: str, tmp: Path) -> Iterator[Live]:
    live = Live(mosquitto.url, run_id, ckpt, defence, tmp / "out")
    try:
        # joined, told the defence by the retained weights, and holding their client half
        live.wait(lambda: live.agent.live_ready() and live.agent.live_net is not None)
        yield live
    finally:
        live.close()


def _send(live: Live, crops: np.ndarray) -> np.ndarray:
    """The client half's raw output for each crop, and each sent as a live frame."""
    net = live.agent.live_net
    assert net is not None
    with torch.no_grad():
        raw = net(torch.from_numpy(crops)).numpy()
    for i in range(len(crops)):
        assert live.agent.send_predict(i, raw[i : i + 1], time.perf_counter())
    live.wait(lambda: len(live.answers) == len(crops))
    return raw


@pytest.mark.parametrize("defence", ["none", "noise-1-int8"])
def test_live_frames_leave_as_the_defence_allows(
    defence: str, mosquitto: Mosquitto, checkpoints: dict[str, Path], crops: np.ndarray,
    tmp_path: Path,
) -> None:  # fmt: skip
    with _live(mosquitto, f"live-{defence}", checkpoints["standard"], defence, tmp_path) as live:
        raw = _send(live, crops)
        live.wait(lambda: len(live.sent(MsgType.PREDICT, "/up")) == FRAMES)
        sent = live.sent(MsgType.PREDICT, "/up")
        assert len(live.sent(MsgType.PREDICTION, "/down")) == FRAMES
    got = np.concatenate([unpack_activations(m.tensors) for m in sent])
    err = (got - raw).reshape(FRAMES, -1)
    rel = err.std(axis=1) / raw.reshape(FRAMES, -1).std(axis=1)
    if defence == "none":
        assert all(set(m.tensors) == {"activations"} for m in sent)
        assert all(m.tensors["activations"].dtype == np.float32 for m in sent)
        np.testing.assert_array_equal(got, raw)  # fp32, no noise: the client half's output
    else:
        # int8 codes with their scales, and Gaussian noise of one sample std on top
        assert all(set(m.tensors) == {"activations", "act_scale", "act_min"} for m in sent)
        assert all(m.tensors["activations"].dtype == np.uint8 for m in sent)
        assert np.all((rel > 0.8) & (rel < 1.2)), rel
        # keyed by the device's secret: two frames never get the same noise
        assert not np.allclose(err[0], err[1])


def test_a_u_shaped_live_answer_is_features_and_the_device_finishes_it(
    mosquitto: Mosquitto, checkpoints: dict[str, Path], crops: np.ndarray, tmp_path: Path
) -> None:
    with _live(mosquitto, "live-u", checkpoints["u"], "none", tmp_path) as live:
        raw = _send(live, crops)
        answers = list(live.answers)
        msgs = [decode(p) for n, p, _, _ in live.tap.snapshot() if "/cam-01/" in n and p
                and not n.endswith(("/status", "/prediction"))]  # fmt: skip
    types = [m.type for m in msgs]
    assert MsgType.PREDICTION not in types, types
    predicts = [m for m in msgs if m.type is MsgType.PREDICT]
    features = [m for m in msgs if m.type is MsgType.FEATURES]
    assert len(predicts) == FRAMES and len(features) == FRAMES
    for m in predicts:  # smashed data only: no logits, no labels
        assert set(m.tensors) == {"activations"}
    for m in features:
        assert set(m.tensors) == {"features"} and m.tensors["features"].shape[-1] != 7
    # The device's head finished each prediction, and it is the whole model's.
    model_cfg, client, server = load_model(checkpoints["u"])
    assert model_cfg.shape == "u"
    server.eval()
    with torch.no_grad():
        want = torch.softmax(server(torch.from_numpy(raw)), 1).numpy()
    got = np.array([a.probs for a in sorted(answers, key=lambda a: a.frame)])
    np.testing.assert_allclose(got, want, atol=1e-4)
