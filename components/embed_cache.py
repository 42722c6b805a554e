"""The text-embedding cache: the one module that knows its on-disk format.

Layout of a cache folder::

    index.json              {"prompts_sha256", "count", "shape", "dtype", "teacher",
                             "shards": [{"file", "start", "count", "sha256"}],
                             "null": {"file", "sha256"}}
    null.safetensors        {"text": (1, L, D)}           the unconditional embedding
    shard-00000.safetensors {"text": (n, L, D)}           prompts start .. start + n

in the stored ``dtype`` (fp16 by default: half the disk and page cache of fp32); readers cast
rows to their own dtype. The shard format itself (writing, resuming, lazy memory-mapped reads,
hash checks) is ``components.shards``.

SDXL teachers add ``"pooled"`` (n, D_pooled) and ``"time_ids"`` (n, 6) to every file, and their
unconditional embedding is zeros when the pipeline says so (``force_zeros_for_empty_prompt``).

Shards are written one at a time into ``<dir>.partial`` and kept there if the run is killed, so a
re-run resumes after the last complete shard; the finished folder replaces ``<dir>`` by rename.
Distillation reads embeddings from here, a batch's rows at a time, and never loads the text
encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.generation import precision_dtype
from components.io import CacheError, read_json, sha256_bytes
from components.pair_cache import PairsConfig
from components.shards import (
    ShardedTable,
    load_verified,
    save_tensors,
    write_table,
)
from components.teacher import TextConditioning

INDEX = "index.json"
__all__ = ["CacheConfig", "CacheError", "EmbeddingCache", "write_cache"]


@dataclass(frozen=True)
class CacheConfig:
    """``params.yaml: cache``. ``dtype``: how embeddings are stored (readers cast to their own
    dtype); ``device`` and ``precision``: where and in which precision the text encoder and the
    pair sampler run."""

    shard_size: int = 4096
    batch_size: int = 64
    dtype: str = "float16"
    device: str = "cpu"
    precision: str = "fp32"
    pairs: PairsConfig = field(default_factory=PairsConfig)  # teacher ODE pairs (reflow)

    def validate(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be positive")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} is not one of float32, float16, bfloat16")
        precision_dtype(self.precision)


Encoder = Callable[[Sequence[str]], TextConditioning | torch.Tensor]  # prompts -> (B, L, D)


def prompts_hash(prompts: Sequence[str]) -> str:
    return sha256_bytes("\n".join(prompts).encode())


FIELDS = ("text", "pooled", "time_ids")


def _as_conditioning(x: TextConditioning | torch.Tensor) -> TextConditioning:
    return x if isinstance(x, TextConditioning) else TextConditioning(x)


def _tensors(cond: TextConditioning) -> dict[str, torch.Tensor]:
    return {k: getattr(cond, k).cpu() for k in FIELDS if getattr(cond, k) is not None}


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
    """Encode every prompt into shards (resuming a killed run's shards; split over the processes
    of a ``torch.distributed`` job), and the unconditional embedding: ``null`` if given (SDXL's
    zeros), else the encoded empty prompt."""
    out_dir = Path(out_dir)
    dtype = getattr(torch, cfg.dtype)
    digest = prompts_hash(prompts)

    def make(start: int, stop: int) -> dict[str, torch.Tensor]:
        return _tensors(_encode(encode, prompts[start:stop], cfg.batch_size, dtype))

    def progress(k: int, stop: int) -> None:
        log(f"cache_teacher: shard {k} ({stop}/{len(prompts)} prompts)")

    key = {"prompts_sha256": digest, "dtype": cfg.dtype}

    def finish(work: Path, shards: list[dict]) -> dict:
        empty = _cast(_as_conditioning(encode([""]) if null is None else null), dtype)
        return {**key, "count": len(prompts), "shape": list(empty.text.shape[1:]),
                "teacher": teacher, "shards": shards,
                "null": {"file": "null.safetensors",
                         "sha256": save_tensors(work / "null.safetensors", _tensors(empty))}}

    index = write_table(out_dir, key, len(prompts), cfg.shard_size, "shard", make, progress,
                        finish)
    return index


class EmbeddingCache:
    """Lazy read access to a cache folder: rows are read from memory-mapped shards when asked
    for, each shard's hash checked the first time it is opened; nothing is loaded whole."""

    def __init__(self, folder: str | Path, expected_prompts_sha256: str | None = None):
        self.folder = Path(folder)
        if not (self.folder / INDEX).exists():
            raise CacheError(f"no embedding cache at {self.folder} (missing {INDEX}); build it "
                             "with `dvc repro cache_teacher`")
        self.index = read_json(self.folder / INDEX)
        if expected_prompts_sha256 and self.index["prompts_sha256"] != expected_prompts_sha256:
            raise CacheError(f"embedding cache {self.folder} was built for other prompts; "
                             "re-run `dvc repro cache_teacher`")
        self._table = ShardedTable(self.folder, self.index["shards"], "cache shard")
        null = load_verified(self.folder, self.index["null"], "cache null embedding")
        self._fields = tuple(k for k in FIELDS if k in null)
        self._null = TextConditioning(*(null.get(k) for k in FIELDS))

    def __len__(self) -> int:
        return int(self.index["count"])

    def verify(self) -> None:
        """Check every shard's hash now (once: reads do not check it again)."""
        self._table.verify()

    @property
    def opened(self) -> list[str]:
        """The shard files read so far (each hash-checked once, when first opened)."""
        return self._table.opened

    def conditioning(self, indices: torch.Tensor | Sequence[int],
                     dtype: torch.dtype = torch.float32) -> TextConditioning:
        """Embeddings of prompts ``indices`` (B,) as conditioning (B, L, D) in ``dtype`` (the
        consumer's; the cache may store fp16 or bf16), read from their shards only."""
        def read(name: str) -> torch.Tensor | None:
            return self._table.rows(name, indices).to(dtype) if name in self._fields else None
        return TextConditioning(read("text"), read("pooled"), read("time_ids"))

    def null(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> TextConditioning:
        """The unconditional embedding in ``dtype``, repeated ``batch`` times."""
        return _cast(self._null, dtype).expand(batch)
