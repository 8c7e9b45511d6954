"""The split network's declared shapes are the shapes it computes, at every cut."""

from __future__ import annotations

import pytest
import torch

from splitfed.model import ModelConfig, build_split_model, feature_dim, smashed_shape


@pytest.mark.parametrize("bottleneck", [None, 8])
@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_declared_shapes_match_the_halves_at_every_cut(cut: int, bottleneck: int | None) -> None:
    # The wire's validators and the ONNX export check against smashed_shape; a cut after the
    # last block (which does not pool) once declared a third of the real width and height.
    cfg = ModelConfig(cut=cut, bottleneck=bottleneck)
    client, server = build_split_model(cfg, seed=0)
    client.eval(), server.eval()
    with torch.no_grad():
        smashed = client(torch.zeros(2, *cfg.input_shape))
        features = server.features(smashed)
        logits = server(smashed)
    assert tuple(smashed.shape[1:]) == smashed_shape(cfg)
    assert tuple(features.shape[1:]) == (feature_dim(cfg),)
    assert tuple(logits.shape) == (2, cfg.num_classes)
