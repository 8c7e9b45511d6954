"""Anti-aliased downsampling travels inside the exported client half.

With `ModelConfig.antialias` the client half blurs before each subsampling (a fixed depthwise
convolution, not saved with the weights). The checkpoint names the setting, the exported graph
carries the blur, the ONNX model gives the torch half's output, and the int8 model still agrees
with the torch network on the test people's crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from export.onnx import FP32_TOLERANCE, export_client
from splitfed.data.batches import to_tensor
from splitfed.data.dataset import EmotionDataset
from splitfed.model import BlurPool, ClientNet, ModelConfig, ServerNet
from splitfed.onnx_client import OnnxClient
from tests.export.conftest import torch_out, train_small

MIN_AGREEMENT = 0.9


@dataclass
class Blurred:
    client: ClientNet
    server: ServerNet
    test: EmotionDataset
    out: Path
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def blurred(tmp_path_factory: pytest.TempPathFactory) -> Blurred:
    run = train_small(tmp_path_factory, "antialias-run", ModelConfig(antialias=True))
    assert run.cfg.antialias and any(isinstance(m, BlurPool) for m in run.client.modules())
    out = tmp_path_factory.mktemp("antialias-export")
    manifest = export_client(
        run.client, run.cfg, out, calibration=run.train.images, version="antialias-v1"
    )
    return Blurred(run.client, run.server, run.test, out, manifest)


def _depthwise_convs(path: Path) -> int:
    graph = onnx.load(str(path)).graph
    groups = [
        a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"
    ]
    return sum(g > 1 for g in groups)


def test_the_graphs_carry_the_blur(blurred: Blurred) -> None:
    assert blurred.manifest["model"]["antialias"] is True
    # One blur per subsampling of the device's blocks (the strided first convolution and each
    # max-pool), kept through int8 quantization.
    blurs = sum(isinstance(m, BlurPool) for m in blurred.client.modules())
    assert blurs == 3
    for name in ("client_fp32.onnx", "client_int8.onnx"):
        assert _depthwise_convs(blurred.out / name) == blurs, name


def test_onnx_matches_the_torch_half(blurred: Blurred) -> None:
    assert blurred.manifest["parity_ok"], blurred.manifest["parity"]
    crops = blurred.test.images[:16]
    live = OnnxClient(blurred.out / "client_fp32.onnx").run_crops(crops)
    ref = torch_out(blurred.client, to_tensor(crops).numpy())
    assert np.abs(live - ref).max() <= FP32_TOLERANCE


def test_int8_antialiased_model_agrees(blurred: Blurred) -> None:
    q = OnnxClient(blurred.out / "client_int8.onnx").run_crops(blurred.test.images)
    pred = torch_out(blurred.server, q).argmax(1)
    smashed = torch_out(blurred.client, to_tensor(blurred.test.images).numpy())
    ref = torch_out(blurred.server, smashed).argmax(1)
    assert len(np.unique(ref)) >= 2, "the model predicts one class: agreement means nothing"
    assert np.mean(pred == ref) >= MIN_AGREEMENT
