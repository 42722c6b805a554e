"""The eval card: everything needed to judge whether two metric values are comparable.

Every FID / CLIP number is written with its card (style rule 14; methods-reference §3.4 lists the
settings that make published numbers differ: caption list, reference set, resize, FID
implementation, N, guidance, seeds, precision).
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata

from components.config import from_dict, to_dict

CARD_VERSION = 2
VERSIONED_PACKAGES = ("torch", "diffusers", "torch-fidelity", "clean-fid", "open-clip-torch",
                      "pillow", "numpy")


@dataclass(frozen=True)
class EvalCard:
    """Fields of the eval card JSON."""

    protocol: str  # a name of components.evaluation.protocols.PROTOCOLS, e.g. "coco2014_30k"
    caption_list_sha256: str  # caption_list_hash(captions)
    n_images: int
    reference_sha256: str  # content hash of the reference image set
    reference_stats_key: str  # key of the cached reference statistics
    resize: str  # how generated and reference images reach the feature network
    feature_network: str
    feature_weights_sha256: str
    clip_model: str  # scorer spec, e.g. "ViT-g-14:laion2b_s12b_b42k" or a scorer folder
    clip_weights: str  # pretrained tag or sha256 of the weights file
    base_seed: int
    precision: str  # precision the images were generated in: "fp32" or "bf16"
    guidance_scale: float | None  # s in diffusers' convention (s = 1 + w); null when unguided
    steps: int  # sampler steps per image (1 for a one-step student)
    device: str
    seeds: str = "image i uses seed base_seed + i"
    processes: int = 1  # processes the images were split over (by index: the same images)
    clip_prefix: str = ""
    caption_file: str = ""  # the caption file's name (no machine paths)
    protocol_size: int | None = None  # N of the full protocol; null: as many captions as given
    complete: bool = True  # n_images equals the protocol's N (else a proxy, not reportable)
    n_reference: int = 0  # images behind the reference statistics
    fid_implementation: str = ""
    safety_checker: str = "off"
    latency: dict = field(default_factory=dict)  # batch-1 latency and how it was measured
    # how the metrics' ``<metric>_std`` were measured (components.evaluation.uncertainty)
    uncertainty: dict = field(default_factory=dict)
    notes: str = ""
    versions: dict = field(default_factory=dict)
    card_version: int = CARD_VERSION

    def validate(self) -> None:
        if self.n_images < 1 or self.steps < 1:
            raise ValueError("n_images and steps must be >= 1")
        if self.protocol_size is not None and self.complete != (self.n_images == self.protocol_size):
            raise ValueError(f"complete={self.complete} but n_images {self.n_images} vs protocol "
                             f"size {self.protocol_size}")


def eval_card(**settings) -> dict:
    """Build the card as a plain dict; unknown or missing settings are errors naming valid keys.

    ``versions`` defaults to the installed versions of torch, diffusers, torch-fidelity, open_clip,
    numpy and Python.
    """
    settings.setdefault("versions", library_versions())
    return to_dict(from_dict(EvalCard, settings, "eval card"))


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a metric value depends on."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def caption_list_hash(captions: Sequence[str]) -> str:
    """sha256 of the captions in order, one per line (UTF-8, ``\\n``-joined, trailing newline)."""
    return hashlib.sha256(("\n".join(captions) + "\n").encode("utf-8")).hexdigest()


FID_IMPLEMENTATION = ("distillery: torch-fidelity's Inception modules, float64 Frechet distance "
                      "(parity-tested against torch-fidelity and clean-fid)")


def result_cards(common: dict, results: dict[str, dict]) -> dict[str, dict]:
    """A card per result ``{"row": {"steps", "guidance_scale"?}, "latency"?}``: the ``common``
    settings plus the row's own sampler settings; guidance is null when s = 1 or unguided."""
    cards = {}
    for name, result in results.items():
        row = result["row"]
        scale = row.get("guidance_scale")
        cards[name] = eval_card(**{"fid_implementation": FID_IMPLEMENTATION, **common},
                                steps=row["steps"], latency=result.get("latency", {}),
                                guidance_scale=None if scale in (None, 1.0) else scale)
    return cards


def curve_points(rows: Sequence[dict], scales: Sequence[float]) -> list[dict]:
    """The FID-CLIP curve: the rows whose guidance scale is one of ``scales``, by scale."""
    wanted, seen, points = set(scales), set(), []
    for row in rows:
        s = row.get("guidance_scale")
        if s in wanted and s not in seen and row.get("steps", 1) > 1:
            seen.add(s)
            points.append({k: v for k, v in row.items() if k != "attribute_accuracy"})
    return sorted(points, key=lambda p: p["guidance_scale"])
