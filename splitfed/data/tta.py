"""Test-time averaging over where the eye band fell: one photo's answer, steadier.

Another camera's face detector places the band a little higher or lower, tighter or looser
(`splitfed.data.shift` renders those errors). A model scores a crop it was not trained to
read at that placement worse, so `average_probabilities` scores the crop and eight copies of it
moved as a detector would move it (zoomed in and out by 10 and 20 %, shifted up and down by 6
and 12 % of its height; the moves of `splitfed.data.shift.warp`, borders repeated) and averages
the nine probability vectors. Nothing is trained differently: any checkpoint can use it.

Measured over 15 paired runs (3 seeds x 5 folds by person, BENCHMARKS.md): +2.3 ± 0.9 points
in domain and +1.9 ± 0.9 on the domain-shift proxy centralized, +2.6 ± 0.7 and +2.7 ± 0.8 for
SFLV1 at two clients, for nine forward passes a crop; less on anti-aliased networks.
`aggregator evaluate --tta`, `aggregator predict --tta` and the device's offline live
inference (`inference.tta`, `averaged_logits`) use it; the simulator reports both
accuracies with it (`tta_in_domain_accuracy`, `tta_shift_accuracy`) beside the plain ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from splitfed.data.dataset import EmotionDataset
from splitfed.data.shift import (
    OtherCamera,
    SplitHalves,
    predict_probabilities,
    split_halves,
    warp,
)
from splitfed.training import softmax

TTA_KEYS = ("tta_in_domain_accuracy", "tta_shift_accuracy")  # what `tta_metrics` reports

# (dy as a share of the height, zoom); the first is the crop itself.
PLACEMENTS: tuple[tuple[float, float], ...] = (
    (0.0, 1.0),
    (0.0, 1.1),
    (0.0, 1 / 1.1),
    (0.0, 1.2),
    (0.0, 1 / 1.2),
    (0.06, 1.0),
    (-0.06, 1.0),
    (0.12, 1.0),
    (-0.12, 1.0),
)


def views(images: np.ndarray) -> np.ndarray:
    """(len(PLACEMENTS) * N, C, H, W): every placement of every uint8 crop, placement-major."""
    return np.concatenate(
        [images if (dy, zoom) == (0.0, 1.0) else warp(images, dy=dy, zoom=zoom)
         for dy, zoom in PLACEMENTS]
    )  # fmt: skip


def average_probabilities(
    probabilities: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """(N, classes): the mean over PLACEMENTS of `probabilities` (crops -> (n, classes) softmax)
    of each crop's views, computed `batch_size` crops at a time (each with all its views)."""
    k = len(PLACEMENTS)
    out = []
    for s in range(0, len(images), batch_size):
        chunk = images[s : s + batch_size]
        p = probabilities(views(chunk))
        out.append(p.reshape(k, len(chunk), -1).mean(axis=0))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


Crops = Callable[[np.ndarray], np.ndarray]  # uint8 (N, C, H, W) crops -> (N, classes)


def averaged_logits(logits: Crops) -> Crops:
    """`logits` (uint8 crops -> (n, classes) logits, an ONNX full model's for instance) made
    test-time averaged: the returned function gives the log of `average_probabilities`, logits
    whose softmax is the mean of the placements' probabilities. The device's offline live
    inference (`inference.tta`) runs it."""

    def probabilities(views: np.ndarray) -> np.ndarray:
        return softmax(logits(views))

    return lambda crops: np.log(np.maximum(average_probabilities(probabilities, crops), 1e-30))


def tta_metrics(
    model: SplitHalves,
    test: EmotionDataset,
    seed: int = 0,
    strength: float = 1.0,
    shifted: OtherCamera | None = None,
) -> dict[str, Any]:
    """`tta_in_domain_accuracy` and `tta_shift_accuracy`: `shift_metrics`' two headline
    accuracies (the same test crops, the same `other_camera` set, or `shifted`, drawn for `test`
    at this seed and strength) with test-time averaging. Returns {} for a model without split
    halves."""
    halves = split_halves(model)
    if halves is None or len(test) == 0:
        return {}

    def acc(images: np.ndarray) -> float:
        probs = average_probabilities(lambda x: predict_probabilities(*halves, x), images)
        return float(np.mean(probs.argmax(1) == test.labels))

    camera = shifted or OtherCamera.of(test.images, seed, strength)
    on_shift = acc(camera.check(test, seed, strength))
    return dict(zip(TTA_KEYS, (acc(test.images), on_shift), strict=True))
