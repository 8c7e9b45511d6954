"""Per-crop normalisation travels inside the exported client half.

Training, the ONNX export and live inference must standardise a crop the same way. The
normalisation is a layer of the client half (ModelConfig.input_norm="per-crop"), so the exported
graph carries it: the ONNX model gives the torch half's output on the same crops, ignores a
crop's exposure and contrast as the torch half does, and the int8 model still agrees.
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
from splitfed.model import ClientNet, ModelConfig, PerCropNorm, ServerNet
from splitfed.onnx_client import OnnxClient
from tests.export.conftest import torch_out, train_small

MIN_AGREEMENT = 0.9


@dataclass
class PerCrop:
    cfg: ModelConfig
    client: ClientNet
    server: ServerNet
    test: EmotionDataset
    out: Path
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def per_crop(tmp_path_factory: pytest.TempPathFactory) -> PerCrop:
    run = train_small(tmp_path_factory, "per-crop-run", ModelConfig(input_norm="per-crop"))
    assert isinstance(run.client.norm, PerCropNorm), "the checkpoint lost input_norm"
    out = tmp_path_factory.mktemp("per-crop-export")
    manifest = export_client(
        run.client, run.cfg, out, calibration=run.train.images, server_net=run.server,
        full_model=True, eval_data=run.test, version="per-crop-v1",
    )  # fmt: skip
    return PerCrop(run.cfg, run.client, run.server, run.test, out, manifest)


def test_the_graph_normalises_before_the_first_convolution(per_crop: PerCrop) -> None:
    graph = onnx.load(str(per_crop.out / "client_fp32.onnx")).graph
    readers = [n.op_type for n in graph.node if graph.input[0].name in n.input]
    assert "Conv" not in readers and "ReduceMean" in readers, readers


def test_onnx_matches_the_torch_half_on_live_crops(per_crop: PerCrop) -> None:
    assert per_crop.manifest["parity"]["fp32_max_abs_diff"] <= FP32_TOLERANCE
    crops = per_crop.test.images[:16]
    live = OnnxClient(per_crop.out / "client_fp32.onnx").run_crops(crops)  # the agent's path
    ref = torch_out(per_crop.client, to_tensor(crops).numpy())  # the training path
    assert np.abs(live - ref).max() <= FP32_TOLERANCE


def test_exported_half_ignores_exposure_and_contrast(per_crop: PerCrop) -> None:
    client = OnnxClient(per_crop.out / "client_fp32.onnx")
    crops = per_crop.test.images[:16].astype(np.float64)
    # A flatter, brighter picture of the same crops, kept inside 0..255 so nothing clips.
    lit = np.rint(crops * 0.6 + 70).astype(np.uint8)
    same = client.run_crops(lit)
    ref = client.run_crops(np.rint(crops).astype(np.uint8))
    # Rounding to whole grey levels is the only difference; it moves the output a little.
    rel = np.abs(same - ref).mean() / np.abs(ref).mean()
    assert rel < 0.05, rel
    glob = torch_out(per_crop.client.blocks, to_tensor(lit).numpy())  # the layers without the norm
    assert np.abs(glob - ref).mean() / np.abs(ref).mean() > 10 * rel


def test_int8_per_crop_model_agrees(per_crop: PerCrop) -> None:
    p = per_crop.manifest["parity"]
    assert p["int8_top1_agreement"] >= MIN_AGREEMENT, p
    q = OnnxClient(per_crop.out / "client_int8.onnx").run_crops(per_crop.test.images)
    pred = torch_out(per_crop.server, q).argmax(1)
    smashed = torch_out(per_crop.client, to_tensor(per_crop.test.images).numpy())
    ref = torch_out(per_crop.server, smashed).argmax(1)
    assert len(np.unique(ref)) >= 2, "the model predicts one class: agreement means nothing"
    assert np.mean(pred == ref) >= MIN_AGREEMENT


def test_int8_keeps_the_normalisation_and_the_first_convolution_in_float(
    per_crop: PerCrop,
) -> None:
    """A standardised crop has no fixed range for a calibration on raw pixels to fit: the
    normalisation and the convolution it feeds stay float, quantization starts after them."""
    graph = onnx.load(str(per_crop.out / "client_int8.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    first = next(n for n in graph.node if n.op_type == "Conv")
    data, weight = first.input[0], first.input[1]
    assert data not in producer or producer[data].op_type == "Div", producer.get(data)
    assert weight not in producer or producer[weight].op_type != "DequantizeLinear"
    later = [n for n in graph.node if n.op_type == "Conv" and n is not first]
    assert later and all(producer[n.input[1]].op_type == "DequantizeLinear" for n in later)
