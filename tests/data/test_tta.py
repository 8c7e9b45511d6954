"""Test-time averaging: the views, the average, and what the simulator reports with it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from splitfed.data.dataset import EmotionDataset
from splitfed.data.shift import predict_probabilities, shift_set, warp
from splitfed.data.tta import PLACEMENTS, TTA_KEYS, average_probabilities, tta_metrics, views
from splitfed.model import ModelConfig, build_split_model


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 48, 96), dtype=np.uint8)


def halves() -> tuple[torch.nn.Module, torch.nn.Module]:
    return build_split_model(ModelConfig(widths=(8, 16, 16), cut=1), 0)


def test_views_are_the_crop_then_each_placement() -> None:
    x = crops(3)
    v = views(x)
    assert v.shape == (len(PLACEMENTS) * 3, 1, 48, 96) and v.dtype == np.uint8
    assert np.array_equal(v[:3], x)
    for k, (dy, zoom) in enumerate(PLACEMENTS[1:], start=1):
        assert np.array_equal(v[3 * k : 3 * k + 3], warp(x, dy=dy, zoom=zoom)), (dy, zoom)
        assert not np.array_equal(v[3 * k : 3 * k + 3], x)


def test_the_average_is_each_crops_own_mean_whatever_the_batch() -> None:
    client, server = halves()
    x = crops(7)

    def probs(images: np.ndarray) -> np.ndarray:
        return predict_probabilities(client, server, images)

    by_hand = np.mean([probs(warp(x, dy=dy, zoom=zoom)) for dy, zoom in PLACEMENTS], axis=0)
    for batch in (1, 3, 256):  # a crop's views never mix with another crop's
        got = average_probabilities(probs, x, batch_size=batch)
        np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_hand.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(by_hand, probs(x), atol=1e-4)  # the placements do change the answer


def test_tta_metrics_score_the_halves_on_the_test_and_the_proxy() -> None:
    client, server = halves()
    x = crops(10, seed=1)
    labels = np.arange(10) % 7
    test = EmotionDataset("t", x, labels)
    got = tta_metrics(SimpleNamespace(client_net=client, server_net=server), test, seed=4)
    assert set(got) == set(TTA_KEYS)

    def acc(images: np.ndarray) -> float:
        p = average_probabilities(lambda v: predict_probabilities(client, server, v), images)
        return float(np.mean(p.argmax(1) == labels))

    assert got["tta_in_domain_accuracy"] == pytest.approx(acc(x))
    assert got["tta_shift_accuracy"] == pytest.approx(acc(shift_set(x, "other_camera", 4)))
    assert tta_metrics(SimpleNamespace(client_net=None, server_net=None), test) == {}


def test_the_simulators_final_metrics_build_the_proxy_set_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`proxy_metrics` gives both functions' numbers from one `other_camera` set."""
    import splitfed.data.shift as shift_module
    import splitfed.simulate as simulate_module
    from splitfed.data.shift import shift_metrics

    client, server = halves()
    test = EmotionDataset("t", crops(14, seed=2), np.arange(14) % 7)
    model = SimpleNamespace(client_net=client, server_net=server)
    want = {**shift_metrics(model, test, seed=3), **tta_metrics(model, test, seed=3)}
    built: list[str] = []

    def counting(images: np.ndarray, name: str = "other_camera", *a: object) -> np.ndarray:
        built.append(name)
        return shift_set(images, name, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(shift_module, "shift_set", counting)
    assert simulate_module.proxy_metrics(model, test, seed=3) == want
    assert built.count("other_camera") == 1


def test_a_proxy_set_from_another_draw_is_refused() -> None:
    """A shared `other_camera` set must be the one the metrics would draw: another seed, strength
    or test set would pair its accuracy with other per-perturbation figures."""
    from splitfed.data.shift import OtherCamera, shift_metrics

    client, server = halves()
    test = EmotionDataset("t", crops(14, seed=2), np.arange(14) % 7)
    model = SimpleNamespace(client_net=client, server_net=server)
    same = OtherCamera.of(test.images, seed=3)
    assert shift_metrics(model, test, seed=3, shifted=same) == shift_metrics(model, test, seed=3)
    for wrong in (
        OtherCamera.of(test.images, seed=4),
        OtherCamera.of(test.images, seed=3, strength=0.5),
        OtherCamera.of(test.images[:7], seed=3),
    ):
        for metrics in (shift_metrics, tta_metrics):
            with pytest.raises(ValueError, match="other_camera set holds"):
                metrics(model, test, seed=3, shifted=wrong)
