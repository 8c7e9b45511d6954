"""The synthetic eye-region set: seeded, balanced, and with expressions a model can tell apart."""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.data import synth
from splitfed.data.synth import AUS, PROTOTYPES, SynthConfig, generate_synth, make_identity, render
from splitfed.emotions import EMOTIONS


def test_seeded_and_balanced() -> None:
    cfg = SynthConfig(identities=4, per_emotion=2, seed=11)
    a, b = generate_synth(cfg), generate_synth(cfg)
    assert np.array_equal(a.images, b.images)
    assert a.images.shape == (4 * 7 * 2, 1, 48, 96) and a.images.dtype == np.uint8
    assert set(a.class_counts().values()) == {8}
    assert len(a.subject_counts()) == 4 and a.meta["synthetic"] is True
    c = generate_synth(cfg.model_copy(update={"seed": 12}))
    assert not np.array_equal(a.images, c.images)


def test_each_call_gets_its_own_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendered once per process, but a caller that writes into its set spoils no other."""
    cfg = SynthConfig(identities=2, per_emotion=1, seed=3)
    a = generate_synth(cfg)
    a.images[:] = 0
    a.labels[:] = 0
    b = generate_synth(cfg)
    assert b.images.any() and set(b.labels.tolist()) == set(range(len(EMOTIONS)))
    # Above the byte bound nothing is kept, and the set is the same.
    monkeypatch.setattr(synth, "CACHE_BYTES", 0)
    other = cfg.model_copy(update={"seed": 4})
    calls = synth._cached.cache_info()
    assert np.array_equal(generate_synth(other).images, generate_synth(other).images)
    after = synth._cached.cache_info()
    assert (after.hits, after.misses) == (calls.hits, calls.misses)  # rendered, never kept


def test_every_emotion_has_a_prototype() -> None:
    assert set(PROTOTYPES) == set(EMOTIONS)
    assert PROTOTYPES["neutral"] == {}


def test_confusable_pairs_stay_closer() -> None:
    """Drawn with identical pose, lighting and noise, only the action units differ: fear is
    closer to surprise than surprise is to neutral, and so on for the pairs people confuse."""
    ident = make_identity(np.random.default_rng(5), resting=0.0)

    def draw(emotion: str) -> np.ndarray:
        aus = {au: PROTOTYPES[emotion].get(au, 0.0) for au in AUS}
        return render(ident, aus, np.random.default_rng(9), pixel_noise=0.0).astype(np.float32)

    def dist(a: str, b: str) -> float:
        return float(np.abs(draw(a) - draw(b)).mean())

    assert dist("neutral", "neutral") == 0.0
    assert dist("afraid", "surprised") < dist("surprised", "neutral")
    assert dist("angry", "disgusted") < dist("angry", "surprised")
    assert dist("sad", "neutral") < dist("surprised", "neutral")
    assert min(dist(e, "neutral") for e in EMOTIONS if e != "neutral") > 0.5
