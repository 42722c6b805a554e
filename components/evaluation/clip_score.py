"""CLIP score: mean cosine similarity (x1) between image and caption embeddings of an open_clip model.

One code path serves the world's own scorer (a local open_clip folder, see ``scorer``) and the
published protocol's ``ViT-g-14:laion2b_s12b_b42k`` (methods-reference §3.1 step 4): the model's
own preprocess (resize, centre crop, normalise) and tokenizer, fp32, optional caption prefix
("A photo depicts " in the GigaGAN protocol; prepending the text tokenizes the same as splicing
its tokens after the start token), truncation to the model's context length.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from components.evaluation.scorer import CONFIG_FILE, WEIGHTS_FILE
from components.io import read_json, sha256_file

HOW_TO_SUPPLY = (
    "Supply the weights in one of three ways: (1) on a machine with network access, load the spec "
    "once without HF_HUB_OFFLINE so open_clip caches the weights (then copy the Hugging Face cache "
    "to this machine); (2) download the checkpoint file yourself and pass "
    "'<model name>:/path/to/open_clip_pytorch_model.bin'; (3) pass a local open_clip folder "
    f"({CONFIG_FILE} + {WEIGHTS_FILE})."
)


class ScorerWeightsMissing(FileNotFoundError):
    """CLIP weights are neither cached nor downloadable; the message says how to supply them."""


@dataclass(frozen=True)
class Scorer:
    """An open_clip model with its own eval preprocess and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL -> (3, S, S)
    tokenizer: Callable[[list[str]], torch.Tensor]  # captions -> (B, L) token ids
    spec: str
    name: str
    weights: str  # pretrained tag, or sha256 of the local weights file

    def describe(self) -> dict:
        """Plain description for the eval card."""
        return {"spec": self.spec, "name": self.name, "weights": self.weights}


def load_scorer(spec: str, device: str | torch.device = "cpu") -> Scorer:
    """Load a CLIP scorer from a local open_clip folder or ``"<model>:<tag or checkpoint path>"``.

    ``"hf-hub:org/repo"`` (open_clip's own schema) is passed through unchanged.
    """
    import open_clip

    if Path(spec).is_dir():
        return _load_folder(Path(spec), device)
    if spec.startswith("hf-hub:"):
        return _create(spec, None, spec, spec, spec.removeprefix("hf-hub:"), device)
    name, sep, pretrained = spec.partition(":")
    if not sep or not name or not pretrained:
        raise ValueError(f"scorer spec {spec!r}: expected a folder with {CONFIG_FILE}, or "
                         f"'<open_clip model name>:<pretrained tag or checkpoint path>'")
    if name not in open_clip.list_models():
        raise ValueError(f"scorer spec {spec!r}: unknown open_clip model {name!r} "
                         f"(see open_clip.list_models())")
    if os.path.isfile(pretrained):
        return _create(name, pretrained, spec, name, sha256_file(pretrained), device)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(f"scorer spec {spec!r}: {pretrained!r} is neither an existing file nor a "
                         f"pretrained tag of {name} (tags: {tags})")
    _fetch_tag_weights(spec, tag_cfg)
    return _create(name, pretrained, spec, name, pretrained, device)


def clip_similarities(images: np.ndarray, captions: Sequence[str], scorer: Scorer,
                      prefix: str = "", batch_size: int = 32) -> np.ndarray:
    """Cosine similarity of each uint8 image ``(N, H, W, 3)`` with its caption -> ``(N,)``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    device = next(scorer.model.parameters()).device
    out = []
    scorer.model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            pixels = torch.stack([scorer.preprocess(Image.fromarray(im)) for im in batch])
            texts = [prefix + c for c in captions[start:start + batch_size]]
            tokens = scorer.tokenizer(texts)
            img = F.normalize(scorer.model.encode_image(pixels.to(device)).float(), dim=-1)
            txt = F.normalize(scorer.model.encode_text(tokens.to(device)).float(), dim=-1)
            out.append((img * txt).sum(dim=-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def clip_score(images: np.ndarray, captions: Sequence[str], scorer: Scorer, prefix: str = "",
               batch_size: int = 32) -> float:
    """Mean cosine similarity between image and caption embeddings (x1, so 0.30 not 30)."""
    return float(clip_similarities(images, captions, scorer, prefix, batch_size).mean())


def _load_folder(folder: Path, device: str | torch.device) -> Scorer:
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config.is_file() or not weights.is_file():
        raise ScorerWeightsMissing(f"scorer folder {folder} needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    name = read_json(config).get("name", folder.name)
    return _create(f"local-dir:{folder}", None, str(folder), name, sha256_file(weights), device)


def _create(model_id: str, pretrained: str | None, spec: str, name: str, weights: str,
            device: str | torch.device) -> Scorer:
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_id, pretrained=pretrained, device=device, precision="fp32")
    except (OSError, RuntimeError) as err:
        raise ScorerWeightsMissing(f"could not load CLIP scorer {spec!r}: {err}. "
                                   f"{HOW_TO_SUPPLY}") from err
    model.eval().requires_grad_(False)
    return Scorer(model, preprocess, open_clip.get_tokenizer(model_id), spec, name, weights)


def _fetch_tag_weights(spec: str, tag_cfg: dict) -> None:
    """Download (or find cached) weights for a pretrained tag before building the model."""
    import open_clip

    try:
        path = open_clip.pretrained.download_pretrained(tag_cfg)
    except Exception as err:  # hub and urllib raise many types; all mean "not available here"
        raise ScorerWeightsMissing(f"CLIP weights for {spec!r} are not available "
                                   f"({type(err).__name__}: {err}). {HOW_TO_SUPPLY}") from err
    if not path:
        raise ScorerWeightsMissing(f"CLIP weights for {spec!r} are not available. {HOW_TO_SUPPLY}")
