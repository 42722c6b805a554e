"""Fréchet Inception Distance (Heusel et al. 2017, arXiv 1706.08500v6, eq. 6) and cached statistics.

Features come from torch-fidelity's Inception extractor (``components.evaluation.inception``).
How images reach it is the protocol's ``Preprocess`` (``components.evaluation.resize``): for the
miniature world, uint8 images through torch-fidelity's own TF1-compatible bilinear resize (numbers
match ``torch_fidelity.calculate_metrics(fid=True)`` on the same images); for the COCO protocols,
centre crop + LANCZOS 256 and clean-fid's ``clean`` resize to 299.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.evaluation.inception import FeatureNetwork, pool3_of_resized
from components.evaluation.resize import (
    Preprocess,
    center_crop_resize,
    check_images,
    clean_resize_batch,
    parallel_map,
)
from components.io import atomic_write_bytes, read_json, sha256_file, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STATS_FORMAT = 2
WORLD_PREPROCESS = Preprocess()


def inception_features(images: np.ndarray, extractor: FeatureNetwork | torch.nn.Module,
                       batch_size: int = 32,
                       preprocess: Preprocess = WORLD_PREPROCESS) -> np.ndarray:
    """Pool3 features of uint8 images ``(N, H, W, 3)`` -> float64 ``(N, 2048)``.

    ``preprocess`` crops (if the protocol says so) and brings the images to 299x299; PIL work
    runs on a thread pool (PIL releases the GIL while resizing).
    """
    batches = (preprocess.crop(b) for b in _array_batches(images, batch_size))
    return _features_of_batches(batches, extractor, preprocess)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of features ``(N, D)``, float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    ``tr((S1 S2)^(1/2))`` is computed as ``tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)``: the two
    matrices are similar, and ``A S2 A`` is symmetric PSD, so a symmetric eigensolver applies and
    the rank-deficient covariances of small sample sets give no complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}")
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_against_statistics(mu: np.ndarray, sigma: np.ndarray, features: np.ndarray) -> float:
    """FID between a Gaussian ``(mu (D,), sigma (D, D))`` and features ``(N, D)``.

    With N < D (small evaluation sets) the sample covariance is ``S2 = X^T X / (N - 1)`` for the
    centred features X, and ``sigma @ S2`` has the same non-zero eigenvalues as the symmetric PSD
    ``X sigma X^T / (N - 1)`` (N, N): the same value as ``frechet_distance``, without any D x D
    eigendecomposition.
    """
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    if n < 2 or np.shape(mu) != (d,):
        raise ValueError(f"need features (N >= 2, {np.shape(mu)[0]}), got {features.shape}")
    if n >= d:
        return frechet_distance(mu, sigma, *feature_statistics(features))
    mu2 = features.mean(axis=0)
    x = features - mu2
    inner = x @ np.asarray(sigma, np.float64) @ x.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = np.asarray(mu, np.float64) - mu2
    return float(diff @ diff + np.trace(sigma) + np.sum(x * x) / (n - 1) - 2 * tr_covmean)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets ``(N, D)`` and ``(M, D)``."""
    if len(features_a) < len(features_b):
        features_a, features_b = features_b, features_a
    return fid_against_statistics(*feature_statistics(features_a), features_b)


def kid_from_features(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100,
                      subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018, arXiv 1801.01401v5): mean and std.

    Unbiased MMD^2 with the cubic polynomial kernel ``(x.y / D + 1)^3`` over random subsets of
    ``min(subset_size, N, M)`` features from each set, as in torch-fidelity.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 features in each set")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        values.append(_mmd2_unbiased(x, y))
    return float(np.mean(values)), float(np.std(values))


def reference_statistics(images_or_folder: np.ndarray | str | Path, cache_dir: str | Path,
                         extractor: FeatureNetwork, batch_size: int = 32,
                         preprocess: Preprocess = WORLD_PREPROCESS
                         ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Inception mean/covariance of a reference image set, cached under its content hash.

    ``images_or_folder``: uint8 ``(N, H, W, 3)`` or a folder of PNG/JPEG files (read in sorted
    order, RGB). ``preprocess``: the protocol's crop and resize (a crop is needed when sizes
    differ). The cache key covers the images, the feature network's weights and the
    preprocessing; the files are ``<key>.safetensors`` (mu, sigma float64; every image's
    features float32, for KID and precision/recall) and ``<key>.json`` (meta), both atomic.
    """
    from safetensors.numpy import save

    images_hash, n_images = _content_hash(images_or_folder)
    protocol = {"preprocess": {"crop_size": preprocess.crop_size, "to_299": preprocess.to_299},
                "resize": preprocess.describe(), "format": STATS_FORMAT}
    key_source = {"images_sha256": images_hash, "network": extractor.weights_sha256, **protocol}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    stats_path, meta_path = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    if stats_path.is_file() and meta_path.is_file():
        stats = load_statistics(stats_path)
        return stats["mu"], stats["sigma"], read_json(meta_path)
    features = _features_of_batches(
        _image_batches(images_or_folder, batch_size, preprocess), extractor, preprocess)
    mu, sigma = feature_statistics(features)
    meta = {"key": key, "n_images": n_images, **key_source, "feature_network": extractor.describe(),
            "source": _describe_source(images_or_folder)}
    atomic_write_bytes(stats_path, save({"mu": mu, "sigma": sigma,
                                         "features": features.astype(np.float32)}))
    write_json(meta_path, meta)  # written last: its presence marks a complete entry
    return mu, sigma, meta


def load_statistics(path: str | Path) -> dict[str, np.ndarray]:
    """``mu`` (D,), ``sigma`` (D, D) and, when stored, ``features`` (N, D) of a statistics file."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def feature_subset(features: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` rows of ``features``, chosen with ``seed`` and kept in their original order."""
    if n >= len(features):
        return features
    rows = np.sort(np.random.default_rng(seed).choice(len(features), n, replace=False))
    return features[rows]


def folder_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}")
    return paths


def _features_of_batches(batches: Iterator[np.ndarray], extractor: FeatureNetwork | torch.nn.Module,
                         preprocess: Preprocess = WORLD_PREPROCESS) -> np.ndarray:
    """Features of already-cropped uint8 batches, resized to 299 as ``preprocess`` says."""
    module = extractor.extractor if isinstance(extractor, FeatureNetwork) else extractor
    device = next(module.parameters()).device
    out = []
    with torch.no_grad():
        for batch in batches:
            if preprocess.to_299 == "clean":
                x = torch.from_numpy(clean_resize_batch(batch))
                features = pool3_of_resized(module, x.permute(0, 3, 1, 2).to(device))
            else:
                x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
                features = module(x.to(device))[0]
            out.append(features.cpu().numpy().astype(np.float64))
    if not out:
        raise ValueError("no images given")
    return np.concatenate(out)


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    images = check_images(images)
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def _image_batches(source: np.ndarray | str | Path, batch_size: int,
                   preprocess: Preprocess) -> Iterator[np.ndarray]:
    if not isinstance(source, (str, Path)):
        for batch in _array_batches(source, batch_size):
            yield preprocess.crop(batch)
        return
    paths = folder_images(source)
    for start in range(0, len(paths), batch_size):
        yield _read_images(paths[start:start + batch_size], preprocess.crop_size)


def _read_images(paths: Sequence[Path], size: int | None) -> np.ndarray:
    def read(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(center_crop_resize(im, size) if size else im)

    images = parallel_map(read, paths)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)[:3]}; use a protocol "
                         "that crops (reference.protocol: coco2014_30k or coco2017_5k)")
    return np.stack(images)


def _content_hash(source: np.ndarray | str | Path) -> tuple[str, int]:
    """sha256 of an image set: of the array (shape + bytes), or of a folder's files in order."""
    h = hashlib.sha256()
    if isinstance(source, (str, Path)):
        paths = folder_images(source)
        for path in paths:
            h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
        return h.hexdigest(), len(paths)
    images = np.ascontiguousarray(source)
    h.update(f"{images.dtype}{images.shape}".encode())
    h.update(images.tobytes())
    return h.hexdigest(), len(images)


def _describe_source(source: np.ndarray | str | Path) -> str:
    if isinstance(source, (str, Path)):
        return f"folder {Path(source).resolve()}"
    return f"array {tuple(np.shape(source))}"


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    m = len(x)
    off_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    off_yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_xx + off_yy - 2 * k_xy.mean())
