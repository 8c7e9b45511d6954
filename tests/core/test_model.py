"""The split network's declared shapes are the shapes it computes, at every cut, with and
without anti-aliased downsampling."""

from __future__ import annotations

import pytest
import torch

from splitfed.data.batches import to_tensor
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.model import ModelConfig, build_split_model, conv_macs, feature_dim, smashed_shape


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


@pytest.mark.parametrize("stem_stride", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 48, 96), (1, 37, 53), (3, 64, 64)])
def test_antialiasing_keeps_every_shape_and_weight_name(
    shape: tuple[int, int, int], stem_stride: int
) -> None:
    """The blur has no weights and subsamples as the layer it replaces: the same state dict
    (names, shapes, and values from one seed) and the same smashed data shape."""
    plain = ModelConfig(input_shape=shape, stem_stride=stem_stride)
    blurred = plain.model_copy(update={"antialias": True})
    for a, b in zip(build_split_model(plain, 0), build_split_model(blurred, 0), strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    client, server = build_split_model(blurred, 0)
    client.eval(), server.eval()
    with torch.no_grad():
        smashed = client(torch.zeros(2, *shape))
        assert tuple(smashed.shape[1:]) == smashed_shape(blurred)
        assert tuple(server(smashed).shape) == (2, blurred.num_classes)


def test_antialiasing_steadies_the_client_half_under_a_one_pixel_move() -> None:
    """Zhang's point, on eye crops: with the same weights, moving a crop by one pixel changes
    the smashed data far less when every subsampling is blurred first."""
    x = to_tensor(generate_synth(SynthConfig(identities=4, per_emotion=2)).images[:32])
    moved = torch.roll(x, 1, dims=-1)

    def change(antialias: bool) -> float:
        client, _ = build_split_model(ModelConfig(antialias=antialias), seed=0)
        client.eval()
        with torch.no_grad():
            a, b = client(x), client(moved)
        return float((a - b).norm() / a.norm())

    plain, blurred = change(False), change(True)
    assert blurred < 0.5 * plain, (blurred, plain)


def test_the_multiply_accumulates_count_the_blur() -> None:
    """The device's compute, as bench_core and bench_export report it: with anti-aliasing the
    first convolution runs at full resolution (48 x 96, not 24 x 48) and each blur costs 9 per
    output value (16 x 24 x 48 after it, 16 x 12 x 24 and 32 x 6 x 12 after the pools)."""
    plain, _ = build_split_model(ModelConfig(), 0)
    blurred, _ = build_split_model(ModelConfig(antialias=True), 0)
    first = 16 * 9 * (48 * 96 - 24 * 48)
    blurs = 9 * (16 * 24 * 48 + 16 * 12 * 24 + 32 * 6 * 12)
    assert conv_macs(blurred, (1, 48, 96)) - conv_macs(plain, (1, 48, 96)) == first + blurs
