"""Where training batches come from: prompts only (score-distillation methods) or teacher pairs
(reflow-type methods). Every random draw of iteration k comes from that iteration's generator."""

from __future__ import annotations

from typing import Protocol

import torch

from components.methods import Batch
from components.teacher import TextConditioning


class PairSource(Protocol):
    """Teacher pairs: prompt index (P,), teacher samples x1 (P, ...), the noise of each pair and,
    for caches sampled over a range of CFG scales, each pair's scale (P,) (else ``None``)."""

    prompt: torch.Tensor
    x1: torch.Tensor
    guidance: torch.Tensor | None

    def __len__(self) -> int: ...

    def noise(self, indices: torch.Tensor) -> torch.Tensor: ...


class PromptBatches:
    """Random prompts from a conditioning table (N rows) and fresh Gaussian noise."""

    def __init__(self, table: TextConditioning, null: TextConditioning,
                 latent_shape: tuple[int, ...], device: str | torch.device = "cpu"):
        self.table, self.null_row = table, null
        self.latent_shape, self.device = tuple(latent_shape), device

    @classmethod
    def from_cache(cls, cache, latent_shape: tuple[int, ...], device: str | torch.device = "cpu"):
        """From an ``EmbeddingCache`` (every prompt embedding, and the empty prompt)."""
        return cls(cache.table(), cache.null(1), latent_shape, device)

    def __len__(self) -> int:
        return int(self.table.text.shape[0])

    def __call__(self, batch_size: int, gen: torch.Generator, step: int = 0) -> Batch:
        idx = torch.randint(0, len(self), (batch_size,), generator=gen)
        z = torch.randn((batch_size, *self.latent_shape), generator=gen)
        return Batch(self.table.rows(idx).to(self.device),
                     self.null_row.expand(batch_size).to(self.device), z.to(self.device), gen,
                     step)


class PairBatches(PromptBatches):
    """Random teacher pairs: the pair's prompt, its noise z and the teacher's ODE sample x1."""

    def __init__(self, table: TextConditioning, null: TextConditioning, pairs: PairSource,
                 latent_shape: tuple[int, ...], device: str | torch.device = "cpu"):
        super().__init__(table, null, latent_shape, device)
        self.pairs = pairs
        if len(pairs) == 0:
            raise ValueError("the pair cache is empty; set cache.pairs.count > 0")
        if int(pairs.prompt.max()) >= len(self):
            raise ValueError("pair cache refers to prompts beyond the embedding cache; rebuild "
                             "both with `dvc repro cache_teacher --force`")

    def __call__(self, batch_size: int, gen: torch.Generator, step: int = 0) -> Batch:
        idx = torch.randint(0, len(self.pairs), (batch_size,), generator=gen)
        cond = self.table.rows(self.pairs.prompt[idx])
        scales = getattr(self.pairs, "guidance", None)
        return Batch(cond.to(self.device), self.null_row.expand(batch_size).to(self.device),
                     self.pairs.noise(idx).to(self.device), gen, step,
                     self.pairs.x1[idx].to(self.device),
                     None if scales is None else scales[idx].to(self.device))
