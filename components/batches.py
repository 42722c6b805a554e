"""Where training batches come from: prompts only (score-distillation methods) or teacher pairs
(reflow-type methods). Every random draw of iteration k comes from that iteration's generator,
and only the rows a batch draws (under torchrun: this process's share of them) are read from the
caches (``EmbeddingCache``, ``PairCache`` read shards lazily), so a batch is the same whether the
rows come from a table in memory or from the disk."""

from __future__ import annotations

from typing import Protocol

import torch

from components.methods import Batch
from components.teacher import TextConditioning


class ConditioningSource(Protocol):
    """Prompt embeddings by index: an ``EmbeddingCache``, or a ``ConditioningTable``."""

    def __len__(self) -> int: ...

    def conditioning(self, indices: torch.Tensor, dtype: torch.dtype = ...
                     ) -> TextConditioning: ...


class PairSource(Protocol):
    """Teacher pairs by index: prompt index (B,), the noise z, the teacher's sample x1 and, for
    caches sampled over a range of CFG scales, each pair's scale (B,) (else ``None``)."""

    def __len__(self) -> int: ...

    def prompts(self, indices: torch.Tensor) -> torch.Tensor: ...

    def noise(self, indices: torch.Tensor) -> torch.Tensor: ...

    def samples(self, indices: torch.Tensor, dtype: torch.dtype = ...) -> torch.Tensor: ...

    def guidance(self, indices: torch.Tensor) -> torch.Tensor | None: ...


class ConditioningTable:
    """A conditioning table held in memory (N rows) behind ``ConditioningSource``: small
    conditionings such as the analytic teachers' class embeddings."""

    def __init__(self, table: TextConditioning):
        self.table = table

    def __len__(self) -> int:
        return int(self.table.text.shape[0])

    def conditioning(self, indices: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> TextConditioning:
        return self.table.rows(torch.as_tensor(indices)).cast(dtype)


class PromptBatches:
    """Random prompts from a conditioning source (N rows) and fresh Gaussian noise; ``dtype`` is
    the dtype the batch is handed over in (the cache may store fp16)."""

    def __init__(self, source: ConditioningSource | TextConditioning, null: TextConditioning,
                 latent_shape: tuple[int, ...], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.source = ConditioningTable(source) if isinstance(source, TextConditioning) else source
        self.null_row = null
        self.latent_shape, self.device, self.dtype = tuple(latent_shape), device, dtype

    @classmethod
    def from_cache(cls, cache, latent_shape: tuple[int, ...], device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32):
        """From an ``EmbeddingCache`` (read a batch's rows at a time, and the empty prompt)."""
        return cls(cache, cache.null(1, dtype), latent_shape, device, dtype)

    def __len__(self) -> int:
        return len(self.source)

    def _uncond(self, batch_size: int) -> TextConditioning:
        return self.null_row.expand(batch_size).to(self.device)

    def __call__(self, batch_size: int, gen: torch.Generator, step: int = 0,
                 rows: slice | None = None) -> Batch:
        """The rows ``rows`` (default: all) of a global batch of ``batch_size``; the draws are
        the whole batch's, so a row is the same whichever process reads it."""
        idx = torch.randint(0, len(self), (batch_size,), generator=gen)
        z = torch.randn((batch_size, *self.latent_shape), generator=gen)
        if rows is not None:
            idx, z = idx[rows], z[rows]
        cond = self.source.conditioning(idx, self.dtype).to(self.device)
        return Batch(cond, self._uncond(len(idx)), z.to(self.device), gen, step)


class PairBatches(PromptBatches):
    """Random teacher pairs: the pair's prompt, its noise z and the teacher's ODE sample x1."""

    def __init__(self, source: ConditioningSource | TextConditioning, null: TextConditioning,
                 pairs: PairSource, latent_shape: tuple[int, ...],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(source, null, latent_shape, device, dtype)
        self.pairs = pairs
        if len(pairs) == 0:
            raise ValueError("the pair cache is empty; set cache.pairs.count > 0")

    def __call__(self, batch_size: int, gen: torch.Generator, step: int = 0,
                 rows: slice | None = None) -> Batch:
        """The rows ``rows`` (default: all) of a global batch of ``batch_size`` pairs."""
        idx = torch.randint(0, len(self.pairs), (batch_size,), generator=gen)
        if rows is not None:
            idx = idx[rows]
        prompts = self.pairs.prompts(idx)
        if int(prompts.max()) >= len(self):
            raise ValueError("pair cache refers to prompts beyond the embedding cache; rebuild "
                             "both with `dvc repro cache_teacher --force`")
        cond = self.source.conditioning(prompts, self.dtype).to(self.device)
        scales = self.pairs.guidance(idx)
        return Batch(cond, self._uncond(len(idx)), self.pairs.noise(idx).to(self.device), gen,
                     step, self.pairs.samples(idx, self.dtype).to(self.device),
                     None if scales is None else scales.to(self.device))
