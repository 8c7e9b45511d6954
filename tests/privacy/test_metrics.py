"""The leakage metrics: SSIM held to scikit-image, PSNR, the baseline and re-identification."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from splitfed.privacy.metrics import baseline_ssim, gallery_split, psnr, reidentify, ssim


def _skimage(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        structural_similarity(
            a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )


@pytest.mark.parametrize("noise", [0.02, 0.2, 0.6])
def test_ssim_equals_scikit_image(noise: float) -> None:
    rng = np.random.default_rng(1)
    a = rng.random((4, 48, 96))
    b = np.clip(a + noise * rng.standard_normal(a.shape), 0, 1)
    ours = ssim(a, b)
    theirs = [_skimage(a[i], b[i]) for i in range(4)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def test_ssim_is_one_for_identical_and_falls_with_noise() -> None:
    rng = np.random.default_rng(2)
    a = rng.random((2, 1, 24, 24))
    assert np.allclose(ssim(a, a), 1.0)
    low = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    high = np.clip(a + 0.5 * rng.standard_normal(a.shape), 0, 1)
    assert (ssim(a, low) > ssim(a, high)).all()


def test_ssim_rejects_colour_and_tiny_images() -> None:
    with pytest.raises(ValueError):
        ssim(np.zeros((2, 3, 32, 32)), np.zeros((2, 3, 32, 32)))
    with pytest.raises(ValueError):
        ssim(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))


def test_psnr_known_value() -> None:
    a = np.zeros((1, 16, 16))
    b = np.full((1, 16, 16), 0.1)  # mse 0.01 -> 20 dB
    np.testing.assert_allclose(psnr(a, b), [20.0], atol=1e-9)
    assert psnr(a, a)[0] >= 99.0


def test_baseline_is_ssim_of_the_mean_crop() -> None:
    rng = np.random.default_rng(3)
    pop = rng.random((10, 24, 32))
    victims = rng.random((3, 24, 32))
    mean = pop.mean(0)
    expected = [_skimage(mean, v) for v in victims]
    np.testing.assert_allclose(baseline_ssim(pop, victims), expected, rtol=1e-9)


def test_gallery_split_one_photo_per_person() -> None:
    subjects = np.array(["a", "a", "a", "b", "b", "c"])  # c has one photo: not usable
    gallery, queries = gallery_split(subjects, seed=0)
    assert sorted(subjects[gallery].tolist()) == ["a", "b"]
    assert len(queries) == 3 and set(subjects[queries]) == {"a", "b"}
    assert not set(gallery) & set(queries)


def test_reidentify_perfect_chance_and_wrong() -> None:
    rng = np.random.default_rng(4)
    faces = rng.random((5, 16, 16))
    people = np.array(list("abcde"))
    noisy = faces + 0.05 * rng.standard_normal(faces.shape)
    assert reidentify(noisy, people, faces, people) == 1.0
    shuffled = people[[1, 2, 3, 4, 0]]
    assert reidentify(noisy, shuffled, faces, people) == 0.0
    with pytest.raises(ValueError):
        reidentify(noisy[:0], people[:0], faces, people)
