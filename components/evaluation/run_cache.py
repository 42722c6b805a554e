"""A cache of evaluation results that do not depend on the student (the teacher's rows and its
FID-CLIP curve), keyed by a hash of everything they depend on.

Each entry is ``<key>.safetensors`` (a few sample images) and ``<key>.json`` (the metrics), the
JSON written last so that its presence marks a complete entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.io import atomic_write_bytes, read_json, sha256_bytes, write_json


class RunCache:
    """Results keyed by ``key_of(settings)``; ``get`` returns None on a miss."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def key_of(settings: dict) -> str:
        return sha256_bytes(json.dumps(settings, sort_keys=True).encode())[:20]

    def get(self, settings: dict) -> tuple[dict, np.ndarray] | None:
        from safetensors.numpy import load_file

        key = self.key_of(settings)
        meta, images = self.folder / f"{key}.json", self.folder / f"{key}.safetensors"
        if not (meta.is_file() and images.is_file()):
            return None
        return read_json(meta), load_file(str(images))["images"]

    def put(self, settings: dict, result: dict, images: np.ndarray) -> None:
        from safetensors.numpy import save

        key = self.key_of(settings)
        atomic_write_bytes(self.folder / f"{key}.safetensors",
                           save({"images": np.ascontiguousarray(images)}))
        write_json(self.folder / f"{key}.json", result)
