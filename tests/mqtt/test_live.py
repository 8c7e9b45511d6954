"""Live classification and guided collection, from a video file standing in for the camera.

The video shows a real photo (scikit-image's astronaut), so face detection and the eye crop
are the real ones. Crops never leave the device: only smashed data and JSON answers cross MQTT.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
from click.testing import CliRunner

from aggregator.serve import run_serve
from aggregator.serve_config import ServeBroker, ServeConfig
from edge_agent.agent import Agent
from edge_agent.camera import Camera
from edge_agent.cli import main as agent_main
from edge_agent.config import CameraConfig, LiveConfig
from edge_agent.pipeline import LivePipeline
from edge_agent.store import MARKER, CropStore
from splitfed.client import ClientRuntime
from splitfed.data.partition import client_shards
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.emotions import EMOTIONS
from splitfed.mqtt import LinkSettings

from .fed import AGENT_CMD, Mosquitto, Procs, Tap, check_payloads

FRAMES = 20


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 frames of a face drifting sideways, as an mp4 file."""
    path = tmp_path_factory.mktemp("video") / "face.mp4"
    img = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    h, w = img.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 15, (w, h))
    assert writer.isOpened(), "OpenCV cannot write mp4 here"
    for i in range(FRAMES):
        writer.write(np.roll(img, 2 * i, axis=1))
    writer.release()
    return path


def test_collect_stores_crops_per_emotion(face_video: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = ["collect", "--camera", str(face_video), "--per-emotion", "3", "--every", "2",
            "--emotions", "happy,sad", "--state-dir", str(state)]  # fmt: skip
    res = CliRunner().invoke(agent_main, args, input="\n\n")  # Enter before each emotion
    assert res.exit_code == 0, res.output
    assert "Show a HAPPY face" in res.output and "Show a SAD face" in res.output
    for emotion in ("happy", "sad"):
        files = sorted((state / "crops" / emotion).glob("*.png"))
        assert len(files) == 3
        img = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (48, 96)  # an eye-region crop, not a frame
    assert (state / "crops" / MARKER).is_file()
    # A second, non-interactive session adds to the store; the store loads as a data set.
    res = CliRunner().invoke(agent_main, [*args[:-2], "--state-dir", str(state), "--yes"])
    assert res.exit_code == 0, res.output
    from splitfed.data.crop import CropConfig

    ds = CropStore(state / "crops", CropConfig()).load()
    assert len(ds) == 12 and ds.input_shape == (1, 48, 96)
    assert sorted(np.unique(ds.labels)) == [EMOTIONS.index("happy"), EMOTIONS.index("sad")]


def test_collect_without_a_camera_is_a_user_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.mp4")
    res = CliRunner().invoke(agent_main, ["collect", "--camera", missing, "--yes",
                                          "--state-dir", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2 and "cannot open camera" in res.output


def test_camera_watchdog_reopens_a_dead_source() -> None:
    stop = threading.Event()
    frames: queue.Queue[Any] = queue.Queue(maxsize=2)
    cam = Camera(CameraConfig(source="rtsp://127.0.0.1:9/none", watchdog_seconds=0.3), frames, stop)
    cam.start()
    deadline = time.monotonic() + 20
    while cam.reconnects < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    assert cam.reconnects >= 2 and cam.captured == 0


def test_full_queues_drop_frames_instead_of_blocking(face_video: Path) -> None:
    stop = threading.Event()
    published: list[int] = []

    inputs: list[tuple[Any, tuple[int, ...]]] = []

    def slow_half(crops: np.ndarray) -> np.ndarray:
        inputs.append((crops.dtype, crops.shape))
        time.sleep(0.15)  # a client half far slower than the camera
        return np.zeros((1, 4, 2, 2), np.float32)

    live = LiveConfig(queue_size=1, pace_files=False)
    pipe = LivePipeline(CameraConfig(source=str(face_video)), live, _crop_cfg(), slow_half,
                        lambda i, a, t: published.append(i) or True, stop)  # fmt: skip
    pipe.start()
    assert pipe.done.wait(60)
    stop.set()
    s = pipe.stats()
    assert s["frames"] == FRAMES and 0 < len(published) < FRAMES
    assert sum(s["drops"].values()) > 0  # counted, not silently lost
    assert published == sorted(published)
    c = _crop_cfg()  # each half gets the frame's uint8 crop, and normalises it itself
    assert set(inputs) == {(np.dtype(np.uint8), (1, 1 if c.grayscale else 3, c.height, c.width))}


def _crop_cfg() -> Any:
    from splitfed.data.crop import CropConfig

    return CropConfig()


def test_live_predictions_through_the_aggregator(
    face_video: Path, mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    """Train one round, keep serving; a camera agent (torch half, then ONNX) gets its emotions."""
    run_id = "live"
    stop = threading.Event()
    # No defence: live frames under one are test_live_defence.py's subject.
    cfg = ServeConfig(algo="sflv1", min_clients=1, rounds=1, round_timeout=120, join_timeout=120,
                      broker=ServeBroker(url=mosquitto.url, run_id=run_id), out=tmp_path / "out",
                      serve_forever=True, eval_data="synth", defence="none")  # fmt: skip
    kwargs = {"stop": stop, "live": False, "synth_identities": 3}  # --eval-data: a set of its own
    server = threading.Thread(target=run_serve, args=(cfg,), kwargs=kwargs, daemon=True)
    ds = generate_synth(SynthConfig(identities=4))
    _, _, shards = client_shards(ds, 1, None, None, 0)
    runtime = ClientRuntime("client-00", run_id, *shards[0])
    trainer = Agent(runtime, LinkSettings.from_url(mosquitto.url),
                    "splitfed", run_id, stop)  # fmt: skip
    tap = Tap(mosquitto.url)
    server.start()
    trainer.start()
    threading.Thread(target=trainer.run, daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        m: dict[str, Any] = {}
        while "mqtt" not in m and time.monotonic() < deadline:  # serve's final metrics.json
            time.sleep(0.2)
            if (cfg.out / "metrics.json").exists():
                m = json.loads((cfg.out / "metrics.json").read_text())
        assert "mqtt" in m, "training did not finish"
        assert 0 <= m["rounds"][0]["eval_data_accuracy"] <= 1 and "eval_data_accuracy" in m["final"]

        # The float torch client half, from the retained global weights.
        stats = tmp_path / "cam.json"
        cam = [*AGENT_CMD, "--broker", mosquitto.url, "--client-id", "cam-01", "--run-id", run_id,
               "--camera", str(face_video), "--state-dir", str(tmp_path / "cam"), "--stats-file",
               str(stats)]  # fmt: skip
        procs.start("cam-torch", cam)
        assert procs.wait("cam-torch", 120) == 0, procs.logs()
        lines = re.findall(
            r"^frame (\d+): (\w+) ([0-9.]+) \((\d+) ms\)$", procs.log("cam-torch"), re.M
        )
        assert len(lines) >= 3, procs.logs()
        assert all(e in EMOTIONS for _, e, _, _ in lines)
        s = json.loads(stats.read_text())
        assert s["live"]["frames"] == FRAMES and s["live"]["reconnects"] == 0
        assert s["counters"]["predictions"] == len(lines) and s["predict_latency_ms"]["p50"] > 0

        # The exported ONNX client half of the trained checkpoint.
        from export.onnx import FILES, export_client
        from splitfed.checkpoint import load_model

        model_cfg, client, _ = load_model(cfg.out / "checkpoint")
        export_client(client, model_cfg, tmp_path / "onnx", exporter="torchscript")
        yaml_cfg = tmp_path / "cam.yaml"
        onnx_path = tmp_path / "onnx" / FILES["client_fp32"]
        yaml_cfg.write_text(f"client_id: cam-02\ninference:\n  model: {onnx_path}"
                            "\n  requantize: false\n")  # fmt: skip
        procs.start("cam-onnx", [*AGENT_CMD, "--broker", mosquitto.url, "--config", str(yaml_cfg),
                                 "--run-id", run_id, "--camera", str(face_video), "--state-dir",
                                 str(tmp_path / "cam")])  # fmt: skip
        assert procs.wait("cam-onnx", 120) == 0, procs.logs()
        assert "live client half: ONNX model" in procs.log("cam-onnx")
        assert len(re.findall(r"^frame \d+: \w+ ", procs.log("cam-onnx"), re.M)) >= 3, procs.logs()
    finally:
        stop.set()
        trainer.close()
        server.join(30)
        tap.close()
    msgs = tap.snapshot()
    problems, seen = check_payloads(msgs, "splitfed", run_id)
    assert not problems, problems[:10]
    assert seen["predict"] >= 6 and seen["prediction"] >= 6 and seen["prediction_json"] >= 6, seen
    answers = [json.loads(p) for n, p, _, _ in msgs if n == f"splitfed/{run_id}/cam-01/prediction"]
    assert answers and all(a["emotion"] in EMOTIONS for a in answers)
    assert not server.is_alive()


def test_a_trained_checkpoint_is_served_live_without_training(
    face_video: Path, mosquitto: Mosquitto, procs: Procs, tmp_path: Path
) -> None:
    """`serve --checkpoint C --live`: a camera agent with no training data gets its emotions."""
    from splitfed.simulate import SimSpec, simulate

    simulate(generate_synth(SynthConfig(identities=4)),
             SimSpec("centralized", 1, 1, out_dir=tmp_path / "trained"))  # fmt: skip
    run_id = "live-only"
    stop = threading.Event()
    broker = ServeBroker(url=mosquitto.url, run_id=run_id)
    ckpt = tmp_path / "trained" / "checkpoint"
    # Served with the defence it was trained with (none): the default's cut would not fit it.
    cfg = ServeConfig(algo="sflv1", live_model=ckpt, broker=broker, out=tmp_path / "out",
                      defence="none")  # fmt: skip
    server = threading.Thread(
        target=run_serve, args=(cfg,), kwargs={"stop": stop, "live": False}, daemon=True
    )
    server.start()
    try:
        cam = [*AGENT_CMD, "--broker", mosquitto.url, "--client-id", "cam-live", "--run-id",
               run_id, "--camera", str(face_video), "--state-dir",
               str(tmp_path / "cam")]  # fmt: skip
        procs.start("cam-live", cam)
        assert procs.wait("cam-live", 180) == 0, procs.logs()
        lines = re.findall(r"^frame \d+: (\w+) [0-9.]+ \(\d+ ms\)$", procs.log("cam-live"), re.M)
        assert len(lines) >= 3 and all(e in EMOTIONS for e in lines), procs.logs()
        assert not (cfg.out / "metrics.json").exists()  # nothing was trained
        assert server.is_alive()  # still serving
    finally:
        stop.set()
        server.join(30)
    assert not server.is_alive()


def test_live_and_checkpoint_go_together(tmp_path: Path) -> None:
    from aggregator.cli import main as aggregator_main

    res = CliRunner().invoke(aggregator_main, ["serve", "--live"])
    assert res.exit_code != 0 and "--live and --checkpoint go together" in res.output


# ---- the card's own command: `edge-agent --camera 0` as a user types it ------------------------


def test_client_id_defaults_to_a_topic_safe_host_name() -> None:
    import socket

    from edge_agent.config import AgentConfig, default_client_id

    assert default_client_id("pi-01.local") == "pi-01-local"
    assert default_client_id("jetson nano#2") == "jetson-nano-2"
    assert default_client_id("...") == "edge-agent"
    assert len(default_client_id("x" * 200)) == 64
    cid = AgentConfig().client_id
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cid)
    assert cid == default_client_id(socket.gethostname())


def test_a_missing_camera_is_reported_at_once(tmp_path: Path) -> None:
    """No broker, no weights: the camera is checked first, with the device and the fix."""
    index = next(str(i) for i in range(63, 0, -1) if not Path(f"/dev/video{i}").exists())
    res = CliRunner().invoke(
        agent_main, ["--camera", index, "--broker", "mqtt://127.0.0.1:9", "--state-dir",
                     str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert f"/dev/video{index}" in res.output and "group `video`" in res.output
    assert "--camera FILE" in res.output and "client_id" not in res.output
    res = CliRunner().invoke(agent_main, ["--camera", str(tmp_path / "none.mp4")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_the_cards_command_says_what_is_wrong(tmp_path: Path) -> None:
    if Path("/dev/video0").exists():
        pytest.skip("this machine has a camera 0: the command would run")
    res = CliRunner().invoke(agent_main, ["--camera", "0", "--state-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "client_id" not in res.output and "camera 0 (/dev/video0)" in res.output


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_offline_predictions_without_a_broker_are_counted_not_logged_per_frame(
    face_video: Path, tmp_path: Path, tta: bool
) -> None:
    """The full model on the device classifies the video alone, plain or averaged over the
    band's placements (`inference.tta`)."""
    import subprocess

    import yaml

    from splitfed.model import ModelConfig, build_split_model
    from splitfed.quantize import export_client

    cfg = ModelConfig()
    client, server = build_split_model(cfg, 0)
    export_client(client, cfg, tmp_path / "model", server_net=server, full_model=True,
                  exporter="torchscript")  # fmt: skip
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "inference": {"full_model": str(tmp_path / "model" / "full_fp32.onnx"), "tta": tta},
        "state_dir": str(tmp_path / "state"),
    }))  # fmt: skip
    stats = tmp_path / "stats.json"
    cmd = [*AGENT_CMD, "--config", str(config), "--camera", str(face_video), "--broker",
           "mqtt://127.0.0.1:9", "--stats-file", str(stats)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    frames = [line for line in run.stdout.splitlines() if line.startswith("frame ")]
    assert len(frames) >= 5, run.stdout  # the device classified the video on its own
    assert run.stderr.count("no MQTT broker connected") == 1
    assert ("averaged over nine band placements" in run.stderr) == tta
    assert " ERROR " not in run.stderr and "MQTT publish to" not in run.stderr
    counters = json.loads(stats.read_text())
    assert counters["mqtt"]["publish_failures"] >= len(frames), counters
