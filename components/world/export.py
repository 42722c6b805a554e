"""COCO caption format on disk: ``<split>/captions.json`` plus ``<split>/images/<file_name>``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.io import read_json, write_json


def write_split(folder: str | Path, images: np.ndarray, captions: list[str]) -> None:
    """Write uint8 (N, H, W, 3) images as PNGs and their captions as COCO ``captions.json``."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for i, (image, text) in enumerate(zip(images, captions, strict=True)):
        name = f"{i:06d}.png"
        Image.fromarray(image).save(folder / "images" / name, optimize=False, compress_level=1)
        h, w = image.shape[:2]
        entries.append({"id": i, "file_name": name, "width": int(w), "height": int(h)})
        annotations.append({"id": i, "image_id": i, "caption": text})
    write_json(folder / "captions.json", {"images": entries, "annotations": annotations})


def read_captions(folder: str | Path) -> list[tuple[str, str]]:
    """(file_name, caption) per annotation, in annotation order."""
    data = read_json(Path(folder) / "captions.json")
    names = {entry["id"]: entry["file_name"] for entry in data["images"]}
    return [(names[a["image_id"]], a["caption"]) for a in data["annotations"]]


def read_split(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, H, W, 3) images and their captions, one per annotation."""
    folder = Path(folder)
    pairs = read_captions(folder)
    images = [np.asarray(Image.open(folder / "images" / n).convert("RGB")) for n, _ in pairs]
    return np.stack(images), [text for _, text in pairs]
