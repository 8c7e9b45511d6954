"""Shared fixtures: a small synthetic data set, made once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitfed.data.dataset import EmotionDataset
from splitfed.data.synth import SynthConfig, generate_synth
from tests.mqtt.fed import Mosquitto


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, the workers share the cores: torch's threads are divided among them
    rather than each worker starting one per core (two workers with two threads each on two
    cores run several times slower than with one each)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def small_synth() -> EmotionDataset:
    """12 synthetic people x 7 emotions x 2 pictures: enough for every code path, fast."""
    return generate_synth(SynthConfig(identities=12, per_emotion=2, seed=3))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto on a free 127.0.0.1 port, stopped after the test."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()
