"""Teacher ODE pairs held in memory, for the tiny tiers: 8 noises (seeds 100–107) and the
teacher's 2-step guided samples from them, behind the pair cache's ``PairSource`` interface."""

from __future__ import annotations

import torch

from components.embed_cache import EmbeddingCache
from components.generation import ddim_sample, seeded_noise


class MemoryPairs:
    """8 noises of ``latent`` shape and ``denoiser``'s 2-step samples at CFG 3 (DDIM on a VP
    teacher, the flow's Euler steps on a flow teacher), every pair at that one scale."""

    def __init__(self, denoiser, cache: EmbeddingCache, latent: tuple[int, ...]):
        self.latent = latent
        self.prompt = torch.arange(8) % len(cache)
        self.seed = torch.arange(8) + 100
        with torch.no_grad():
            self.x1 = ddim_sample(denoiser, self.noise(torch.arange(8)),
                                  cache.conditioning(self.prompt), cache.null(8), 2, 3.0)

    def __len__(self) -> int:
        return 8

    def noise(self, idx):
        return seeded_noise(self.seed[idx].tolist(), self.latent)

    def prompts(self, idx):
        return self.prompt[idx]

    def samples(self, idx, dtype=torch.float32):
        return self.x1[idx].to(dtype)

    def guidance(self, idx):
        return None  # every pair at one CFG scale
