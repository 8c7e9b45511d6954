"""Shared fixtures: a small synthetic data set, made once per session."""

from __future__ import annotations

import pytest

from splitfed.data.dataset import EmotionDataset
from splitfed.data.synth import SynthConfig, generate_synth


@pytest.fixture(scope="session")
def small_synth() -> EmotionDataset:
    """12 synthetic people x 7 emotions x 2 pictures: enough for every code path, fast."""
    return generate_synth(SynthConfig(identities=12, per_emotion=2, seed=3))
