"""Test-time averaging in the device's offline live inference (`inference.tta`)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from splitfed.data.shift import predict_probabilities
from splitfed.data.tta import average_probabilities, averaged_logits
from splitfed.onnx_client import InferenceConfig, OnnxClient
from tests.export.conftest import Exported, Trained


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_the_full_onnx_model_averaged_is_the_checkpoint_averaged(
    exported: Exported, trained: Trained
) -> None:
    """The device's averaged logits (fp32 ONNX full model) give the probabilities that
    `aggregator predict --tta` computes from the checkpoint's torch halves."""
    images = trained.test.images[:12]
    full = OnnxClient(exported.out / "full_fp32.onnx")
    got = _softmax(averaged_logits(full.run_crops)(images))
    want = average_probabilities(
        lambda v: predict_probabilities(trained.client, trained.server, v), images
    )
    np.testing.assert_allclose(got, want, atol=1e-4)
    plain = _softmax(np.asarray(full.run_crops(images), dtype=np.float64))
    assert not np.allclose(got, plain, atol=1e-3)  # the average is not the crop alone


def test_tta_without_the_full_model_is_refused(exported: Exported) -> None:
    with pytest.raises(ValidationError, match="inference.tta needs inference.full_model"):
        InferenceConfig(tta=True)
    cfg = InferenceConfig(tta=True, full_model=exported.out / "full_fp32.onnx")
    assert cfg.tta
