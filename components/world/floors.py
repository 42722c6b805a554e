"""The world's floors: the protocol applied to images that are right by construction.

The real renders behind the evaluation captions (the ``eval`` split) and the teacher VAE's
reconstructions of them are scored like any model. Real renders against the reference renders give
the FID that sampling alone leaves on this many images; the reconstructions' FID and attribute
accuracy say how much of a teacher's distance is its VAE's, which no UNet can remove.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.io import read_json

FLOORS = ("real_renders", "vae_reconstruction")


def renders_of(split: str | Path, rows: list[dict]) -> np.ndarray:
    """uint8 (N, H, W, 3): the render behind each prepared caption row (``image_id``) of a split
    written by ``export.write_split``."""
    split = Path(split)
    data = read_json(split / "captions.json")
    names = {entry["id"]: entry["file_name"] for entry in data["images"]}
    missing = [r["image_id"] for r in rows if r.get("image_id") not in names]
    if missing:
        raise ValueError(f"{len(missing)} evaluation captions have no render in {split} (e.g. "
                         f"image id {missing[0]}); re-run `dvc repro bootstrap prepare_prompts`")
    return np.stack([np.asarray(Image.open(split / "images" / names[r["image_id"]]).convert("RGB"))
                     for r in rows])
