"""Every device config in firmware_configs/ is a valid AgentConfig and fits the units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_agent.config import AgentConfig
from splitfed.model import ModelConfig
from splitfed.onnx_client import OnnxClient
from tests.export.conftest import Exported
from tests.export.test_systemd import parse_unit

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "firmware_configs").glob("*.yaml"))
EXPECTED = {"rpi4", "rpi5", "jetson-nano", "jetson-orin"}
CORES = {"rpi4": 4, "rpi5": 4, "jetson-nano": 4, "jetson-orin": 6}


def _load(path: Path) -> AgentConfig:
    return AgentConfig.model_validate(yaml.safe_load(path.read_text()))


def test_every_device_has_a_config() -> None:
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_and_consistent(path: Path) -> None:
    cfg = _load(path)
    device = path.stem
    crop_shape = (cfg.crop.channels, cfg.crop.height, cfg.crop.width)
    assert crop_shape == ModelConfig().input_shape, "crops must fit the default model"
    assert cfg.inference.model is not None and cfg.inference.model.suffix == ".onnx"
    assert cfg.inference.model.is_relative_to(cfg.state_dir)
    assert 1 <= cfg.inference.threads < CORES[device]
    providers = cfg.inference.providers
    assert providers[-1] == "CPUExecutionProvider"
    if device.startswith("jetson"):
        assert providers[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        trt = cfg.inference.provider_options["TensorrtExecutionProvider"]
        assert trt["trt_engine_cache_enable"] == "True"
        assert trt["trt_engine_cache_path"].startswith("/var/cache/splitfed/")
        assert cfg.camera.backend == "gstreamer" and "nvarguscamerasrc" in cfg.camera.source
    else:
        assert providers == ["CPUExecutionProvider"]
    if cfg.camera.backend == "gstreamer":
        caps = f"width={cfg.camera.width},height={cfg.camera.height}"
        assert caps in cfg.camera.source.replace(" ", ""), "pipeline caps differ from the size"
    assert cfg.broker.url.startswith("mqtts://") and cfg.broker.tls.ca_file is not None
    assert cfg.broker.username == cfg.client_id  # the broker ACL's %u patterns rely on it
    assert cfg.crop.face_model is not None and str(cfg.crop.face_model).startswith("/opt/splitfed/")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_matches_the_systemd_unit(path: Path) -> None:
    cfg = _load(path)
    unit = parse_unit(ROOT / "systemd" / "edge-agent.service")
    credential = unit.value("Service", "LoadCredential").split(":", 1)[0]
    assert cfg.broker.password_file == credential, "password_file must name the unit's credential"
    assert cfg.state_dir == Path("/var/lib") / unit.value("Service", "StateDirectory")
    assert unit.value("Service", "ExecStart").split()[-1] == "/etc/splitfed/agent.yaml"
    for opts in cfg.inference.provider_options.values():
        for key, value in opts.items():
            if key.endswith("_path"):  # ProtectSystem=strict: only the unit's directories
                cache = "/var/cache/" + unit.value("Service", "CacheDirectory")
                assert value.startswith((cache + "/", str(cfg.state_dir) + "/"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_the_exported_model_here(path: Path, exported: Exported) -> None:
    """Each device's inference settings load a real export (absent providers fall back)."""
    cfg = _load(path)
    shape = (cfg.crop.channels, cfg.crop.height, cfg.crop.width)
    client = OnnxClient(exported.out / "client_int8.onnx", cfg.inference, expected_input=shape)
    assert client.providers[-1] == "CPUExecutionProvider"
    assert client.run_crops(np.zeros((1, *shape), np.uint8)).shape[0] == 1
