"""The attack is real: it beats knowing nobody on the undefended default, and noise narrows it."""

from __future__ import annotations

import pytest
import torch

from splitfed.checkpoint import load_model
from splitfed.data.dataset import EmotionDataset
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.defences import DEFENCES, DefenceConfig
from splitfed.errors import UserError
from splitfed.privacy.attack import AttackConfig, Decoder, invert, pixels, wire_activations
from splitfed.privacy.report import Leakage, People, attack_people, measure_leakage
from splitfed.simulate import SimSpec, simulate

# Small but honest: a few epochs at small batches are enough on ten synthetic people.
FAST = AttackConfig(epochs=10, patience=10, width=8, batch_size=4, inversion_steps=0)


@pytest.fixture(scope="module")
def data() -> EmotionDataset:
    return generate_synth(SynthConfig(identities=10, per_emotion=2, seed=3))


@pytest.fixture(scope="module")
def trained(data: EmotionDataset, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """The undefended default: sflv1, 2 clients, a short run; the client half as saved."""
    out = tmp_path_factory.mktemp("sflv1")
    simulate(data, SimSpec("sflv1", 2, 2, out_dir=out))
    _, client, _ = load_model(out / "checkpoint")
    return client


@pytest.fixture(scope="module")
def people(data: EmotionDataset) -> People:
    return attack_people(data, seed=0)


@pytest.fixture(scope="module")
def undefended(trained: torch.nn.Module, people: People) -> Leakage:
    return measure_leakage(trained, DEFENCES["none"], "fp32", people, FAST)


def test_people_are_disjoint(people: People) -> None:
    aux = set(people.aux_train.subjects) | set(people.aux_val.subjects)  # type: ignore[arg-type]
    assert set(people.aux_train.subjects) & set(people.aux_val.subjects) == set()  # type: ignore[arg-type]
    assert aux & set(people.victims.subjects) == set()  # type: ignore[arg-type]
    assert len(set(people.victims.subjects)) >= 2  # type: ignore[arg-type]


def test_attack_beats_the_no_information_baseline(undefended: Leakage) -> None:
    assert undefended.ssim > undefended.ssim_baseline + 0.05
    assert undefended.reid > undefended.reid_chance
    assert undefended.reconstructions.shape == undefended.originals.shape
    assert 0.0 <= undefended.reconstructions.min() and undefended.reconstructions.max() <= 1.0


def test_noise_narrows_the_gap(
    trained: torch.nn.Module, people: People, undefended: Leakage
) -> None:
    noisy = measure_leakage(trained, DefenceConfig(noise=3.0), "fp32", people, FAST)
    gap = undefended.ssim - undefended.ssim_baseline
    assert noisy.ssim - noisy.ssim_baseline < gap / 2
    assert noisy.psnr < undefended.psnr
    assert noisy.bytes_per_sample == undefended.bytes_per_sample


def test_int8_on_the_wire_is_what_the_attacker_gets(
    trained: torch.nn.Module, people: People
) -> None:
    images = people.victims.images[:6]
    z32, b32 = wire_activations(trained, images, DEFENCES["none"], "fp32", (0,))
    z8, b8 = wire_activations(trained, images, DEFENCES["int8"], "fp32", (0,))
    assert b8 < b32 / 3
    assert not torch.equal(z8, z32)
    step = (z32.amax(dim=(2, 3)) - z32.amin(dim=(2, 3))) / 255
    assert ((z8 - z32).abs() <= step[..., None, None] * 0.51 + 1e-3).all()


def test_decoder_reaches_full_size_at_every_cut() -> None:
    for in_shape in [(32, 6, 12), (64, 3, 6), (16, 12, 24), (8, 5, 11)]:
        y = Decoder(in_shape, (1, 48, 96), 4)(torch.randn(2, *in_shape))
        assert y.shape == (2, 1, 48, 96)


def test_inversion_matches_the_known_client_half(trained: torch.nn.Module, people: People) -> None:
    images = people.victims.images[:4]
    z, _ = wire_activations(trained, images, DEFENCES["none"], "fp32", (0,))
    start = pixels(people.aux_train.images).mean(0, keepdim=True)
    few = invert(trained, z, start, FAST.model_copy(update={"inversion_steps": 1}))
    many = invert(trained, z, start, FAST.model_copy(update={"inversion_steps": 40}))

    def feature_error(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((trained((x - 0.5) / 0.25) - z).pow(2).mean())

    assert feature_error(many) < feature_error(few)
    assert all(p.requires_grad for p in trained.parameters())


def test_too_few_people_is_a_user_error() -> None:
    tiny = generate_synth(SynthConfig(identities=3, per_emotion=1))
    with pytest.raises(UserError, match="too few people"):
        attack_people(tiny, seed=0)
    no_ids = EmotionDataset("anon", tiny.images, tiny.labels)
    with pytest.raises(UserError, match="subject ids"):
        attack_people(no_ids, seed=0)
