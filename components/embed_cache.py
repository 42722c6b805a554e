"""The text-embedding cache: the one module that knows its on-disk format.

Layout of a cache folder::

    index.json              {"prompts_sha256", "count", "shape", "dtype", "teacher",
                             "shards": [{"file", "start", "count", "sha256"}],
                             "null": {"file", "sha256"}}
    null.safetensors        {"text": (1, L, D)}           the unconditional embedding
    shard-00000.safetensors {"text": (n, L, D)}           prompts start .. start + n

SDXL teachers add ``"pooled"`` (n, D_pooled) and ``"time_ids"`` (n, 6) to every file, and their
unconditional embedding is zeros when the pipeline says so (``force_zeros_for_empty_prompt``).

Shards are written one at a time into ``<dir>.partial`` and kept there if the run is killed, so a
re-run resumes after the last complete shard; the finished folder replaces ``<dir>`` by rename.
Distillation reads embeddings from here and never loads the text encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.io import (
    CacheError,
    load_verified_shard,
    publish_shards,
    read_json,
    save_tensors,
    sha256_bytes,
    write_resumable_shards,
)
from components.pair_cache import PairsConfig
from components.teacher import TextConditioning

INDEX = "index.json"
__all__ = ["CacheConfig", "CacheError", "EmbeddingCache", "write_cache"]


@dataclass(frozen=True)
class CacheConfig:
    """``params.yaml: cache``."""

    shard_size: int = 4096
    batch_size: int = 64
    dtype: str = "float32"
    pairs: PairsConfig = field(default_factory=PairsConfig)  # teacher ODE pairs (reflow)

    def validate(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be positive")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} is not one of float32, float16, bfloat16")


Encoder = Callable[[Sequence[str]], TextConditioning | torch.Tensor]  # prompts -> (B, L, D)


def prompts_hash(prompts: Sequence[str]) -> str:
    return sha256_bytes("\n".join(prompts).encode())


FIELDS = ("text", "pooled", "time_ids")


def _as_conditioning(x: TextConditioning | torch.Tensor) -> TextConditioning:
    return x if isinstance(x, TextConditioning) else TextConditioning(x)


def _tensors(cond: TextConditioning) -> dict[str, torch.Tensor]:
    return {k: getattr(cond, k) for k in FIELDS if getattr(cond, k) is not None}


def _encode(encode: Encoder, prompts: Sequence[str], batch: int,
            dtype: torch.dtype) -> TextConditioning:
    parts = [_as_conditioning(encode(prompts[i:i + batch])) for i in range(0, len(prompts), batch)]
    out = parts[0]
    for part in parts[1:]:
        out = out.concat(part)
    return _cast(out, dtype)


def _cast(cond: TextConditioning, dtype: torch.dtype) -> TextConditioning:
    cast = lambda a: None if a is None else a.to(dtype)
    return TextConditioning(cond.text.to(dtype), cast(cond.pooled), cast(cond.time_ids))


def write_cache(out_dir: str | Path, prompts: Sequence[str], encode: Encoder, cfg: CacheConfig,
                teacher: str, log: Callable[[str], None] = print,
                null: TextConditioning | None = None) -> dict:
    """Encode every prompt into shards (resuming a killed run's shards), and the unconditional
    embedding: ``null`` if given (SDXL's zeros), else the encoded empty prompt."""
    out_dir = Path(out_dir)
    dtype = getattr(torch, cfg.dtype)
    digest = prompts_hash(prompts)

    def make(start: int, stop: int) -> dict[str, torch.Tensor]:
        return _tensors(_encode(encode, prompts[start:stop], cfg.batch_size, dtype))

    def progress(k: int, stop: int) -> None:
        log(f"cache_teacher: shard {k} ({stop}/{len(prompts)} prompts)")

    work, shards = write_resumable_shards(
        out_dir, {"prompts_sha256": digest, "dtype": cfg.dtype}, len(prompts), cfg.shard_size,
        "shard", make, progress)
    null = _cast(_as_conditioning(encode([""]) if null is None else null), dtype)
    index = {"prompts_sha256": digest, "count": len(prompts), "shape": list(null.text.shape[1:]),
             "dtype": cfg.dtype, "teacher": teacher, "shards": shards,
             "null": {"file": "null.safetensors",
                      "sha256": save_tensors(work / "null.safetensors", _tensors(null))}}
    publish_shards(work, out_dir, index)
    return index


class EmbeddingCache:
    """Read access to a cache folder; every file's hash is checked when it is opened."""

    def __init__(self, folder: str | Path, expected_prompts_sha256: str | None = None):
        self.folder = Path(folder)
        if not (self.folder / INDEX).exists():
            raise CacheError(f"no embedding cache at {self.folder} (missing {INDEX}); build it "
                             "with `dvc repro cache_teacher`")
        self.index = read_json(self.folder / INDEX)
        if expected_prompts_sha256 and self.index["prompts_sha256"] != expected_prompts_sha256:
            raise CacheError(f"embedding cache {self.folder} was built for other prompts; "
                             "re-run `dvc repro cache_teacher`")
        shards = [self._load(s) for s in self.index["shards"]]
        cat = lambda k: torch.cat([s[k] for s in shards]).float() if k in shards[0] else None
        self.text = cat("text") if shards else None
        self.pooled = cat("pooled") if shards else None
        self.time_ids = cat("time_ids") if shards else None
        null = self._load(self.index["null"])
        self._null = TextConditioning(*(null[k].float() if k in null else None for k in FIELDS))

    def _load(self, entry: dict) -> dict[str, torch.Tensor]:
        return load_verified_shard(self.folder, entry, "cache shard")

    def __len__(self) -> int:
        return int(self.index["count"])

    def table(self) -> TextConditioning:
        """Every prompt's conditioning (N, L, D) (plus SDXL's pooled embeddings and time ids)."""
        return TextConditioning(self.text, self.pooled, self.time_ids)

    def conditioning(self, indices: torch.Tensor) -> TextConditioning:
        """Embeddings of prompts ``indices`` (B,) as conditioning (B, L, D)."""
        return self.table().rows(indices)

    def null(self, batch: int = 1) -> TextConditioning:
        """The unconditional embedding, repeated ``batch`` times."""
        return self._null.expand(batch)
