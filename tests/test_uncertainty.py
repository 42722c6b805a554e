"""The metrics' noise: the delete-half jackknife against independent redraws, and its fast FID."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluation.fid import feature_statistics, fid_against_statistics
from components.evaluation.suite import Evaluator, Reference
from components.evaluation.uncertainty import (
    HalfSampling,
    difference_noise,
    subsample_fid,
    subsample_mean,
)


def gaussian_world(d: int, seed: int = 1):
    """Reference statistics of N(0, I) and a generator of N(0.3, A A^T) features ``(n, d)``."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) * np.linspace(0.2, 2, d)
    mu, sigma = feature_statistics(rng.normal(size=(4000, d)))
    return mu, sigma, lambda n: rng.normal(size=(n, d)) @ mix + 0.3


@pytest.mark.parametrize("n, d", [(24, 64), (80, 16)])  # the Gram path (N < D) and the direct one
def test_subsample_fid_equals_fid_of_the_subsample(n, d):
    mu, sigma, draw = gaussian_world(d)
    features = draw(n)
    kept = HalfSampling(replicates=5, seed=3).indices(n)
    assert kept.shape == (5, n - n // 2)
    assert all(len(set(row)) == len(row) for row in kept)  # without replacement
    expected = [fid_against_statistics(mu, sigma, features[idx]) for idx in kept]
    np.testing.assert_allclose(subsample_fid(mu, sigma, features, kept), expected, rtol=1e-7)


def test_fid_standard_error_matches_the_spread_over_redraws():
    """N = 64 images of D = 128 features, N < D as for the world's 256 images of 2048 features:
    the std of FID over 100 independent image sets is 3.6 (seeded, so exact here); the
    jackknife from any one set must land near it (3.0-3.6 measured over three sets)."""
    mu, sigma, draw = gaussian_world(128)
    redraws = np.std([fid_against_statistics(mu, sigma, draw(64)) for _ in range(100)], ddof=1)
    noise = HalfSampling(replicates=100)
    for _ in range(3):
        features = draw(64)
        estimate = noise.standard_error(subsample_fid(mu, sigma, features, noise.indices(64)), 64)
        assert 0.7 * redraws < estimate < 1.3 * redraws, (estimate, redraws)
    # the ordinary bootstrap (with replacement) overstates it: why it is not used
    boot = np.random.default_rng(0).integers(0, 64, size=(50, 64))
    assert np.std([fid_against_statistics(mu, sigma, features[i]) for i in boot]) > 1.25 * redraws


def test_mean_standard_error_is_the_textbook_one():
    values = np.random.default_rng(0).normal(0.3, 0.05, size=256)
    noise = HalfSampling(replicates=400)
    estimate = noise.standard_error(subsample_mean(values, noise.indices(256)), 256)
    assert estimate == pytest.approx(values.std(ddof=1) / np.sqrt(256), rel=0.15)
    assert difference_noise(3.0, 4.0) == 5.0


def test_evaluator_reports_standard_errors_from_the_same_halves():
    mu, sigma, draw = gaussian_world(32)
    reference = Reference(mu, sigma, None, {})
    evaluator = Evaluator(None, reference, None, None, noise=HalfSampling(replicates=50))
    sims = np.random.default_rng(2).normal(0.3, 0.05, size=40)
    out = evaluator.standard_errors(draw(40), sims)
    assert set(out) == {"fid_std", "clip_score_std"} and all(v > 0 for v in out.values())
    assert evaluator.standard_errors(draw(3), sims[:3]) == {}  # too few images to split
    with pytest.raises(ValueError, match="at least|>= 4"):
        HalfSampling().indices(3)
