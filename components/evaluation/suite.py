"""Scoring one model's images under a protocol: FID, CLIP score, and (optionally) KID and
precision/recall, all against reference statistics computed once (``reference_statistics``).

KID (Bińkowski et al. 2018, arXiv 1801.01401v5) and improved precision/recall (Kynkäänniemi et
al. 2019, arXiv 1904.06991v3, k = 3) are torch-fidelity's own functions on the same Inception
features FID uses; they need the reference features, which the statistics file keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from components.evaluation.clip_score import Scorer, clip_similarities
from components.evaluation.fid import feature_subset, fid_against_statistics, inception_features
from components.evaluation.inception import FeatureNetwork
from components.evaluation.protocols import Protocol
from components.evaluation.resize import Preprocess
from components.evaluation.uncertainty import HalfSampling, subsample_fid, subsample_mean

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRC_NEIGHBOURHOOD = 3


@dataclass(frozen=True)
class Reference:
    """Reference statistics in use: mean ``(D,)``, covariance ``(D, D)``, optional features
    ``(M, D)`` for KID and precision/recall, and the meta written by ``reference_statistics``."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    meta: dict

    def check_preprocess(self, protocol: Protocol) -> None:
        """Fail when the statistics were made with another crop or resize than ``protocol``."""
        want = {"crop_size": protocol.preprocess.crop_size, "to_299": protocol.preprocess.to_299}
        got = self.meta.get("preprocess")
        if got != want:
            raise ValueError(
                f"the reference statistics were computed with preprocessing {got}, but protocol "
                f"{protocol.name!r} needs {want}: set `reference.protocol: {protocol.name}` and "
                "re-run `dvc repro reference_stats`")


@dataclass(frozen=True)
class Evaluator:
    """Everything fixed by the protocol and the run; ``score`` is called once per model."""

    protocol: Protocol
    reference: Reference
    network: FeatureNetwork
    scorer: Scorer
    batch_size: int = 32
    kid: bool = False
    precision_recall: bool = False
    seed: int = 0
    noise: HalfSampling = field(default_factory=HalfSampling)

    def score(self, images: np.ndarray, captions: Sequence[str]) -> dict:
        """Metrics of uint8 images ``(N, H, W, 3)`` generated for ``captions`` (in order)."""
        return self.score_stream([(images, captions)])

    def score_stream(self, chunks: Iterable[tuple[np.ndarray, Sequence[str]]]) -> dict:
        """Metrics of images that arrive in chunks ``(images (n, H, W, 3), captions (n,))``."""
        return self.metrics(**self.measure(chunks))

    def measure(self, chunks: Iterable[tuple[np.ndarray, Sequence[str]]]) -> dict:
        """Per-image measurements of chunks of images: Inception ``features`` (N, D) and CLIP
        similarities ``sims`` (N,). Only these are kept (30K images at 512 px would be 24 GB);
        each image's row depends on its batch alone, so they can be measured by several
        processes and gathered (``components.evaluation.sharding``)."""
        features, sims = [], []
        resize_only = Preprocess(None, self.protocol.preprocess.to_299)
        for images, captions in chunks:
            cropped = self.protocol.preprocess.crop(images)  # CLIP also sees the cropped images
            features.append(inception_features(cropped, self.network, self.batch_size,
                                               resize_only))
            sims.append(clip_similarities(cropped, captions, self.scorer,
                                          self.protocol.clip_prefix, self.batch_size))
        return {"features": np.concatenate(features), "sims": np.concatenate(sims)}

    def metrics(self, features: np.ndarray, sims: np.ndarray) -> dict:
        """FID and CLIP score with their standard errors (and KID, precision/recall when on) of
        every image's features ``(N, D)`` and CLIP similarities ``(N,)``, in image order."""
        sims = np.asarray(sims)
        row = {"fid": fid_against_statistics(self.reference.mu, self.reference.sigma, features),
               "clip_score": float(sims.mean()), **self.standard_errors(features, sims)}
        if self.kid or self.precision_recall:
            row.update(self.feature_metrics(features))
        return row

    def standard_errors(self, features: np.ndarray, sims: np.ndarray) -> dict:
        """``fid_std`` and ``clip_score_std`` of features ``(N, D)`` and similarities ``(N,)``
        (``components.evaluation.uncertainty``); both use the same subsamples."""
        n = len(features)
        if n < 4:
            return {}
        kept = self.noise.indices(n)
        fids = subsample_fid(self.reference.mu, self.reference.sigma, features, kept)
        return {"fid_std": self.noise.standard_error(fids, n),
                "clip_score_std": self.noise.standard_error(subsample_mean(sims, kept), n)}

    def feature_metrics(self, features: np.ndarray) -> dict:
        """KID and/or precision, recall, F-score of generated features ``(N, D)``."""
        ref = self.reference.features
        if ref is None:
            raise ValueError("KID and precision/recall need reference features; re-run "
                             "`dvc repro reference_stats` with `reference.keep_features` > 0")
        out: dict = {}
        device = next(self.network.extractor.parameters()).device
        gen_t = torch.from_numpy(features.astype(np.float32))
        if self.kid:
            from torch_fidelity.metric_kid import kid_features_to_metric

            size = min(KID_SUBSET_SIZE, len(features), len(ref))
            kid = kid_features_to_metric(gen_t, torch.from_numpy(ref), kid_subsets=KID_SUBSETS,
                                         kid_subset_size=size, rng_seed=self.seed, verbose=False)
            out.update(kid_mean=kid["kernel_inception_distance_mean"],
                       kid_std=kid["kernel_inception_distance_std"], kid_subset_size=size)
        if self.precision_recall:
            from torch_fidelity.metric_prc import prc_features_to_metric

            # Equal set sizes: the k-NN radii depend on how densely each set is sampled.
            real = torch.from_numpy(feature_subset(ref, len(features), self.seed))
            prc = prc_features_to_metric(gen_t.to(device), real.to(device),
                                         prc_neighborhood=PRC_NEIGHBOURHOOD,
                                         prc_batch_size=10000, save_cpu_ram=True, verbose=False)
            out.update(precision=prc["precision"], recall=prc["recall"], f_score=prc["f_score"])
        return out
