"""How far FID and CLIP score move by chance: a delete-half jackknife over the generated images.

A metric of N images is one draw: other seeds give other images and another value. The delete-d
jackknife (Shao & Wu 1989, Ann. Statist. 17(3), Theorem 1; consistent for non-smooth statistics
when d grows with N) estimates that spread from the images at hand: keep a random N - d of them
without replacement, recompute the metric, repeat ``replicates`` times; the variance is
``(N - d) / d`` times the variance of the subsample values. With d = N / 2 that factor is 1.

Not the ordinary bootstrap: drawing N images with replacement repeats about a third of them, and
for N < D (the 2048 Inception features) the repeats shrink the rank of the covariance, so FID's
bootstrap spread overstates its noise. Measured on Gaussian features (``tests/test_uncertainty``
keeps the first case): std over independent redraws vs the bootstrap's vs this estimate's:
D 128, N 64: 3.6 vs 4.8-5.9 vs 3.0-3.6; D 512, N 256: 3.5 vs 8.6-10.9 vs 3.3-3.5; D 64, N 256:
1.0 vs 1.0 vs 1.0-1.2. On real Inception features of world renders (``bench/metric_noise.py``,
N 256) both resampling estimates said 0.99-1.25 where five fresh draws spread by 0.27: there
the estimate is conservative. The reference statistics stay fixed (the promotion gate compares two models
against the same reference, so its noise is common to both).

For N < D each subsample's FID comes from two N x N Gram matrices computed once, so a replicate
costs one (N/2) x (N/2) eigendecomposition, not a D x D one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from components.evaluation.fid import fid_against_statistics

REPLICATES = 200


@dataclass(frozen=True)
class HalfSampling:
    """``replicates`` random subsets of N - d = ceil(N / 2) images (without replacement)."""

    replicates: int = REPLICATES
    seed: int = 0

    def indices(self, n: int) -> np.ndarray:
        """Kept image indices ``(replicates, n - n // 2)``, each row sorted and distinct."""
        if self.replicates < 2 or n < 4:
            raise ValueError(f"the jackknife needs >= 2 replicates and >= 4 images (got "
                             f"{self.replicates}, {n})")
        rng = np.random.default_rng(self.seed)
        keep = n - n // 2
        return np.sort(np.stack([rng.permutation(n)[:keep] for _ in range(self.replicates)]), 1)

    def standard_error(self, values: np.ndarray, n: int) -> float:
        """The metric's standard error from its subsample ``values`` ``(R,)`` of N images."""
        d = n // 2
        return float(math.sqrt((n - d) / d) * np.std(values, ddof=1))

    def describe(self) -> dict:
        """The eval card's ``uncertainty`` entry."""
        return {"method": "delete-half jackknife over the generated images (Shao & Wu 1989): "
                          "the metric recomputed on random halves drawn without replacement, "
                          "reference statistics fixed",
                "replicates": self.replicates, "seed": self.seed,
                "reported": "<metric>_std: the metric's standard error (std over the halves)"}


def subsample_fid(mu: np.ndarray, sigma: np.ndarray, features: np.ndarray,
                  indices: np.ndarray) -> np.ndarray:
    """FID of each subsample of ``features`` ``(N, D)`` against ``(mu (D,), sigma (D, D))``.

    ``indices`` ``(R, M)`` from ``HalfSampling.indices``; returns ``(R,)``. Equal, replicate for
    replicate, to ``fid_against_statistics(mu, sigma, features[idx])``.
    """
    features = np.asarray(features, np.float64)
    n, d = features.shape
    if n >= d:
        return np.array([fid_against_statistics(mu, sigma, features[idx]) for idx in indices])
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    gram_sigma = features @ sigma @ features.T  # (N, N): f_i^T sigma f_j
    gram = features @ features.T  # (N, N): f_i^T f_j
    f_mu = features @ mu  # (N,)
    constant = float(mu @ mu + np.trace(sigma))
    out = np.empty(len(indices))
    for r, idx in enumerate(indices):
        m = len(idx)
        g, k = gram_sigma[np.ix_(idx, idx)], gram[np.ix_(idx, idx)]
        # centring x = f - mean(f): C G C with C = I - 11^T / m, written with row/column means
        inner = g - g.mean(0, keepdims=True) - g.mean(1, keepdims=True) + g.mean()
        eig = np.linalg.eigvalsh((inner + inner.T) / (2 * (m - 1)))
        tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
        mean_sq = k.sum() / m**2  # |mean(f)|^2
        trace_s2 = (np.trace(k) - m * mean_sq) / (m - 1)
        out[r] = constant - 2 * f_mu[idx].mean() + mean_sq + trace_s2 - 2 * tr_covmean
    return out


def subsample_mean(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of each subsample of per-image ``values`` ``(N,)`` (e.g. CLIP similarities) -> ``(R,)``."""
    return np.asarray(values, np.float64)[indices].mean(axis=1)


def difference_noise(std_a: float, std_b: float) -> float:
    """Standard error of a difference of two independent estimates."""
    return float(np.hypot(std_a, std_b))
