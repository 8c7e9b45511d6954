"""Shared fixtures: a small synthetic data set, made once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitfed.data.dataset import EmotionDataset
from splitfed.data.synth import SynthConfig, generate_synth
from tests.mqtt.fed import Mosquitto


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
