"""Evaluation protocols: which captions, which preprocessing, which CLIP model and prefix.

FID numbers compare only under an identical protocol (methods-reference §3.4), so each protocol
is a named, frozen record and the eval card names it:

- ``coco2014_30k``: GigaGAN's 30,000 COCO-2014 val captions (one a line, used verbatim; SiD-LSG
  and DMD2 ship the same file), reference = every image of val2014, centre crop + LANCZOS 256 for
  both sets, clean-fid's ``clean`` resize to 299, CLIP ViT-g-14 ``laion2b_s12b_b42k`` with the
  prefix "A photo depicts " on the 256-px images (methods-reference §3.1).
- ``coco2017_5k``: COCO-2017 val captions (``captions_val2017.json``), one per image (the
  lowest annotation id, images in id order), reference = the 5,000 val2017 images, the same
  preprocessing and CLIP model (§3.2; the papers do not state the FID resolution for this one).
- ``world``: the miniature world's held-out captions (``prepare_prompts``' ``eval.json``), no
  crop, torch-fidelity's resize, the world's own CLIP scorer, no prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from components.evaluation.resize import Preprocess

VIT_G_14 = "ViT-g-14:laion2b_s12b_b42k"
PHOTO_PREFIX = "A photo depicts "


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol (see the module docstring)."""

    name: str
    description: str
    caption_format: Literal["text", "coco", "prepared"]
    preprocess: Preprocess
    clip_prefix: str
    clip_model: str | None  # the published scorer; None: the project's own scorer
    size: int | None  # N of the full protocol; None: as many captions as given
    reference_size: int | None = None  # images of the full reference set; None: any


PROTOCOLS: dict[str, Protocol] = {
    "world": Protocol(
        "world", "miniature world: held-out captions, torch-fidelity resize, world CLIP scorer",
        "prepared", Preprocess(None, "tf-bilinear"), "", None, None),
    "coco2014_30k": Protocol(
        "coco2014_30k", "COCO-2014 val 30K, GigaGAN captions and protocol (FID at 256 px, "
        "clean-fid resize; reference: all of val2014)",
        "text", Preprocess(256, "clean"), PHOTO_PREFIX, VIT_G_14, 30000, 40504),
    "coco2017_5k": Protocol(
        "coco2017_5k", "COCO-2017 val 5K, one caption per image (FID at 256 px, clean-fid "
        "resize; reference: the val2017 images)",
        "coco", Preprocess(256, "clean"), PHOTO_PREFIX, VIT_G_14, 5000, 5000),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name lists the valid ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; valid protocols are: "
                         f"{', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def read_captions(path: str | Path, caption_format: str) -> list[str]:
    """The protocol's captions from ``path``, in order and verbatim (no normalisation).

    ``text``: UTF-8, one caption a line (blank lines kept out). ``coco``: a COCO captions JSON,
    the lowest-id caption of each image, images sorted by id. ``prepared``: ``prepare_prompts``'
    ``eval.json`` (a list of ``{"caption", "image_id", "annotation_id"}``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} not found; set `evaluate.captions` to the "
                                "protocol's caption file")
    text = path.read_bytes().decode("utf-8")
    if caption_format == "text":
        captions = [line for line in text.splitlines() if line.strip()]
    elif caption_format == "coco":
        captions = _coco_one_per_image(json.loads(text), path)
    elif caption_format == "prepared":
        rows = json.loads(text)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path} is not a prepared caption list (prepare_prompts' eval.json)")
        captions = [r["caption"] for r in rows]
    else:
        raise ValueError(f"unknown caption format {caption_format!r}")
    if not captions:
        raise ValueError(f"{path} holds no captions")
    return captions


def _coco_one_per_image(data: object, path: Path) -> list[str]:
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO captions JSON (no 'annotations'); the coco2017_5k "
                         "protocol reads annotations/captions_val2017.json")
    first: dict[int, tuple[int, str]] = {}
    for a in data["annotations"]:
        image, ann = int(a["image_id"]), int(a["id"])
        if image not in first or ann < first[image][0]:
            first[image] = (ann, a["caption"])
    return [first[image][1] for image in sorted(first)]


def captions_in_training(captions: list[str], train_prompts: list[str]) -> list[str]:
    """Evaluation captions that also appear among the training prompts (after normalisation,
    case-insensitive): a leak that makes the evaluation optimistic."""
    from components.prompts import normalize

    train = {normalize(p).lower() for p in train_prompts}
    return [c for c in captions if normalize(c).lower() in train]
