"""Fixtures for the export tests: one briefly trained checkpoint and one export of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset, train_test_split
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ClientNet, ModelConfig, ServerNet


@dataclass
class Trained:
    checkpoint: Path  # the checkpoint directory
    cfg: ModelConfig
    client: ClientNet
    server: ServerNet
    data: EmotionDataset
    train: EmotionDataset
    test: EmotionDataset


@dataclass
class Exported:
    out: Path
    manifest: dict[str, Any]


def train_small(
    tmp_path_factory: pytest.TempPathFactory, name: str, model: ModelConfig | None = None
) -> Trained:
    """A small model (`model`, default the product's) trained long enough that its predictions
    differ between crops, read back from its checkpoint as an export reads it."""
    from splitfed.checkpoint import load_model
    from splitfed.simulate import SimSpec, simulate

    data = generate_synth(SynthConfig(identities=10, per_emotion=2))
    out = tmp_path_factory.mktemp(name)
    spec = SimSpec(
        algo="centralized", clients=1, rounds=2, out_dir=out, model=model,
        train=TrainConfig(local_epochs=2, batch_size=16),
    )  # fmt: skip
    simulate(data, spec)
    cfg, client, server = load_model(out / "checkpoint")
    train, test = train_test_split(data, "subject", seed=0)
    return Trained(out / "checkpoint", cfg, client, server, data, train, test)


def torch_out(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """`module`'s output in eval mode, as numpy."""
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train_small(tmp_path_factory, "run")


@pytest.fixture(scope="session")
def exported(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """fp32 + int8, client and full model, with the default (dynamo) exporter."""
    from export.onnx import export_client

    out = tmp_path_factory.mktemp("export")
    manifest = export_client(
        trained.client, trained.cfg, out, calibration=trained.train.images,
        server_net=trained.server, full_model=True, eval_data=trained.data, version="test-v1",
    )  # fmt: skip
    return Exported(out, manifest)


def crops(n: int, shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
