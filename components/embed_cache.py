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
unconditional embedding is zeros when the pipeline says so (``force_zeros_for_empty_prompt``);
SD3 and FLUX add ``"pooled"``; SANA adds ``"mask"`` (n, L), Gemma's attention mask over the
padded token sequence (1 where a token is attended, stored in the same dtype).

Shards are written one at a time into ``<dir>.partial`` and kept there if the run is killed, so a
re-run resumes after the last complete shard; the finished folder replaces ``<dir>`` by rename.
Distillation reads embeddings from here, a batch's rows at a time, and never loads the text
encoder.

Encoding on the fly (``cache.text_embeddings: on_the_fly``). A T5-XXL sequence (SD3.5: 333 x 4096,
FLUX.1: 512 x 4096 values) takes 2.7 to 4.2 MB per prompt in fp16, so a million prompts would need
terabytes. In this mode the folder holds the index (``"text_embeddings": "on_the_fly"``, no
shards) and the empty prompt's embedding; distillation loads the text encoders beside the teacher
and ``PromptEncoder`` encodes each batch's prompts when it is drawn. Its rows go through the
storage ``dtype`` as a disk cache's do, so with the encoders in the same precision a batch is the
same in both modes, bit for bit. ``python -m pipeline.plan`` says which mode a run should use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.generation import precision_dtype
from components.io import CacheError, read_cache_index, sha256_bytes
from components.pair_cache import PairsConfig
from components.shards import (
    ShardedTable,
    load_verified,
    save_tensors,
    write_table,
)
from components.teacher import TextConditioning

INDEX = "index.json"
TEXT_MODES = ("disk", "on_the_fly")
__all__ = ["CacheConfig", "CacheError", "EmbeddingCache", "PromptEncoder", "open_embeddings",
           "write_cache"]


@dataclass(frozen=True)
class CacheConfig:
    """``params.yaml: cache``. ``dtype``: how embeddings are stored (readers cast to their own
    dtype); ``device`` and ``precision``: where and in which precision the text encoder and the
    pair sampler run; ``text_embeddings``: ``disk`` (every prompt encoded once, into shards) or
    ``on_the_fly`` (each batch's prompts encoded by the distill stage, on its device)."""

    text_embeddings: str = "disk"
    shard_size: int = 4096
    batch_size: int = 64
    dtype: str = "float16"
    device: str = "cpu"
    precision: str = "fp32"
    pairs: PairsConfig = field(default_factory=PairsConfig)  # teacher ODE pairs (reflow)

    def validate(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be positive")
        if self.text_embeddings not in TEXT_MODES:
            raise ValueError(f"text_embeddings {self.text_embeddings!r} is not one of "
                             f"{', '.join(TEXT_MODES)} (disk: encode every prompt once into "
                             "the cache; on_the_fly: encode each batch during distillation)")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} is not one of float32, float16, bfloat16")
        precision_dtype(self.precision)


Encoder = Callable[[Sequence[str]], TextConditioning | torch.Tensor]  # prompts -> (B, L, D)


def prompts_hash(prompts: Sequence[str]) -> str:
    return sha256_bytes("\n".join(prompts).encode())


FIELDS = ("text", "pooled", "time_ids", "mask")


def _as_conditioning(x: TextConditioning | torch.Tensor) -> TextConditioning:
    return x if isinstance(x, TextConditioning) else TextConditioning(x)


def _tensors(cond: TextConditioning) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in cond.tensors().items()}


def _encode(encode: Encoder, prompts: Sequence[str], batch: int,
            dtype: torch.dtype) -> TextConditioning:
    parts = [_as_conditioning(encode(prompts[i:i + batch])) for i in range(0, len(prompts), batch)]
    out = parts[0]
    for part in parts[1:]:
        out = out.concat(part)
    return _cast(out, dtype)


def _cast(cond: TextConditioning, dtype: torch.dtype) -> TextConditioning:
    return cond.cast(dtype)


def write_cache(out_dir: str | Path, prompts: Sequence[str], encode: Encoder, cfg: CacheConfig,
                teacher: str, log: Callable[[str], None] = print,
                null: TextConditioning | None = None) -> dict:
    """Encode every prompt into shards (resuming a killed run's shards; split over the processes
    of a ``torch.distributed`` job), and the unconditional embedding: ``null`` if given (SDXL's
    zeros), else the encoded empty prompt. With ``text_embeddings: on_the_fly`` only the index
    and the unconditional embedding are written (the prompts are encoded during distillation)."""
    out_dir = Path(out_dir)
    dtype = getattr(torch, cfg.dtype)
    digest = prompts_hash(prompts)
    on_the_fly = cfg.text_embeddings == "on_the_fly"

    def make(start: int, stop: int) -> dict[str, torch.Tensor]:
        return _tensors(_encode(encode, prompts[start:stop], cfg.batch_size, dtype))

    def progress(k: int, stop: int) -> None:
        log(f"cache_teacher: shard {k} ({stop}/{len(prompts)} prompts)")

    key = {"prompts_sha256": digest, "dtype": cfg.dtype, "text_embeddings": cfg.text_embeddings}

    def finish(work: Path, shards: list[dict]) -> dict:
        empty = _cast(_as_conditioning(encode([""]) if null is None else null), dtype)
        return {**key, "count": len(prompts), "shape": list(empty.text.shape[1:]),
                "teacher": teacher, "shards": shards,
                "null": {"file": "null.safetensors",
                         "sha256": save_tensors(work / "null.safetensors", _tensors(empty))}}

    return write_table(out_dir, key, 0 if on_the_fly else len(prompts), cfg.shard_size,
                       "shard", make, progress, finish)


def _read_index(folder: Path, expected_prompts_sha256: str | None) -> dict:
    if not (folder / INDEX).exists():
        raise CacheError(f"no embedding cache at {folder} (missing {INDEX}); build it "
                         "with `dvc repro cache_teacher`")
    index = read_cache_index(folder / INDEX)
    if expected_prompts_sha256 and index["prompts_sha256"] != expected_prompts_sha256:
        raise CacheError(f"embedding cache {folder} was built for other prompts; "
                         "re-run `dvc repro cache_teacher`")
    return index


def _read_null(folder: Path, index: dict) -> TextConditioning:
    null = load_verified(folder, index["null"], "cache null embedding")
    return TextConditioning(**{k: null.get(k) for k in FIELDS})


def text_mode(folder: str | Path) -> str:
    """How the cache at ``folder`` holds its prompts: ``disk`` or ``on_the_fly``."""
    return _read_index(Path(folder), None).get("text_embeddings", "disk")


class EmbeddingCache:
    """Lazy read access to a cache folder: rows are read from memory-mapped shards when asked
    for, each shard's hash checked the first time it is opened; nothing is loaded whole."""

    def __init__(self, folder: str | Path, expected_prompts_sha256: str | None = None):
        self.folder = Path(folder)
        self.index = _read_index(self.folder, expected_prompts_sha256)
        if self.index.get("text_embeddings", "disk") != "disk":
            raise CacheError(f"the cache at {self.folder} holds no prompt embeddings "
                             "(cache.text_embeddings: on_the_fly): read it with "
                             "open_embeddings(folder, encode=...) to encode them on the fly")
        self._table = ShardedTable(self.folder, self.index["shards"], "cache shard")
        self._null = _read_null(self.folder, self.index)
        self._fields = tuple(k for k in FIELDS if getattr(self._null, k) is not None)

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
        return TextConditioning(**{k: read(k) for k in FIELDS})

    def null(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> TextConditioning:
        """The unconditional embedding in ``dtype``, repeated ``batch`` times."""
        return _cast(self._null, dtype).expand(batch)


class PromptEncoder:
    """The prompts of an on-the-fly cache folder, encoded when a batch asks for them: the same
    reads as ``EmbeddingCache`` (``conditioning``, ``null``), each row rounded through the
    folder's storage dtype as the disk cache's rows are. ``encode`` runs the teacher's text
    encoders (on their device, under no gradient)."""

    def __init__(self, folder: str | Path, prompts: Sequence[str], encode: Encoder,
                 expected_prompts_sha256: str | None = None):
        self.folder = Path(folder)
        self.index = _read_index(self.folder, expected_prompts_sha256)
        if prompts_hash(prompts) != self.index["prompts_sha256"]:
            raise CacheError(f"the prompts to encode are not those the cache at {self.folder} "
                             "was made for; re-run `dvc repro cache_teacher`")
        self.prompts, self.encode = list(prompts), encode
        self.storage = getattr(torch, self.index["dtype"])
        self._null = _read_null(self.folder, self.index)

    def __len__(self) -> int:
        return len(self.prompts)

    def verify(self) -> None:
        """Nothing to check beyond what opening checked (the prompts' hash, the null's file)."""

    @property
    def opened(self) -> list[str]:
        return []

    @torch.no_grad()
    def conditioning(self, indices: torch.Tensor | Sequence[int],
                     dtype: torch.dtype = torch.float32) -> TextConditioning:
        rows = [self.prompts[int(i)] for i in torch.as_tensor(indices).reshape(-1)]
        return _cast(_cast(_as_conditioning(self.encode(rows)), self.storage), dtype)

    def null(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> TextConditioning:
        return _cast(self._null, dtype).expand(batch)


def open_embeddings(folder: str | Path, expected_prompts_sha256: str | None = None,
                    encoder: Callable[[], tuple[Sequence[str], Encoder]] | None = None
                    ) -> EmbeddingCache | PromptEncoder:
    """The cache at ``folder`` as a conditioning source: its shards, or for an on-the-fly cache
    a ``PromptEncoder`` of ``encoder()`` (the prompts and the encoding function, made only in
    that mode, so a disk cache never loads a text encoder)."""
    if text_mode(folder) == "disk":
        return EmbeddingCache(folder, expected_prompts_sha256)
    if encoder is None:
        raise CacheError(f"the cache at {folder} encodes its prompts on the fly "
                         "(cache.text_embeddings: on_the_fly) and no text encoder was given")
    prompts, encode = encoder()
    return PromptEncoder(folder, prompts, encode, expected_prompts_sha256)
