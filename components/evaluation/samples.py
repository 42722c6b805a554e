"""The evaluation's sample images on disk: what each model drew for the first captions, with the
seeds, so that two evaluations under one protocol can be shown side by side (the review page).

A folder holds ``samples.json`` (``captions``, ``seeds``, ``rows``: model name -> PNG file names,
one per caption) and the PNG files; written atomically, read back exactly.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.io import atomic_write_bytes, read_json, write_json

INDEX_FILE = "samples.json"
FOLDER = "samples"


@dataclass(frozen=True)
class Samples:
    """Images ``rows[model]`` ``(n, H, W, 3)`` uint8 drawn for ``captions`` with ``seeds``."""

    captions: list[str]
    seeds: list[int]
    rows: dict[str, np.ndarray]

    def same_prompts(self, other: Samples) -> bool:
        """Whether both drew the same captions with the same seeds (comparable image by image)."""
        return self.captions == other.captions and self.seeds == other.seeds


def write_samples(folder: str | Path, captions: Sequence[str], seeds: Sequence[int],
                  rows: Mapping[str, np.ndarray]) -> None:
    """Write ``rows`` (model -> uint8 ``(n, H, W, 3)``, n = len(captions)) as PNGs plus the index
    ``folder/samples.json``; the images go to ``folder/samples/``."""
    folder = Path(folder)
    index: dict[str, list[str]] = {}
    for name, images in rows.items():
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(captions):
            raise ValueError(f"samples of {name!r}: expected uint8 ({len(captions)}, H, W, 3), "
                             f"got {images.dtype} {images.shape}")
        index[name] = []
        for i, image in enumerate(images):
            rel = f"{FOLDER}/{name}-{i:03d}.png"
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            atomic_write_bytes(folder / rel, buffer.getvalue())
            index[name].append(rel)
    write_json(folder / INDEX_FILE, {"captions": list(captions), "seeds": [int(s) for s in seeds],
                                     "rows": index})  # last: its presence marks a full set


def read_samples(folder: str | Path) -> Samples | None:
    """The samples under ``folder`` (written by ``write_samples``), or None when there are none."""
    folder = Path(folder)
    if not (folder / INDEX_FILE).is_file():
        return None
    index = read_json(folder / INDEX_FILE)
    rows = {}
    for name, files in index["rows"].items():
        rows[name] = np.stack([np.asarray(Image.open(folder / rel).convert("RGB"))
                               for rel in files])
    return Samples(list(index["captions"]), [int(s) for s in index["seeds"]], rows)
