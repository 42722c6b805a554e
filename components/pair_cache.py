"""The teacher pair cache: (prompt, noise seed, teacher ODE sample) triples for reflow-type methods.

InstaFlow's reflow and the data-free variant of Meng et al. need samples of the teacher's
probability-flow ODE: for noise ``x0 = seeded_noise(seed)`` the teacher's guided DDIM solution
``x1`` (a latent). Only the seed is stored; the noise is regenerated exactly from it.

Layout::

    index.json              {"prompts_sha256", "teacher", "steps", "guidance_scale",
                             "guidance_range", "count", "latent_shape", "dtype",
                             "shards": [{"file", "start", "count", "sha256"}]}
    pairs-00000.safetensors {"prompt": (n,) int64, "seed": (n,) int64, "x1": (n, C, h, w),
                             "guidance": (n,) float32, only with a guidance range}

With a ``guidance_range`` [lo, hi] (Meng et al.: one CFG scale per pair, s = 1 + w over the
method's w range) pair i is sampled at its own scale drawn uniformly from the range by a generator
seeded with ``seed``; without one every pair uses ``guidance_scale`` (InstaFlow's coupling).

Shards are written into ``<dir>.partial`` and survive a killed run (the re-run resumes after the
last complete shard); the finished folder replaces ``<dir>`` by rename.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from components.generation import seeded_noise
from components.io import (
    CacheError,
    load_verified_shard,
    publish_shards,
    read_json,
    write_resumable_shards,
)

INDEX = "index.json"
# (prompt ids (n,), z (n, C, h, w), CFG scales (n,) or None for the fixed scale) -> x1
Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class PairsConfig:
    """``params.yaml: cache.pairs``: how many teacher pairs, and how they are sampled."""

    count: int = 0  # 0: no pairs (methods that need them stop with a clear error)
    steps: int = 25  # teacher DDIM steps
    guidance_scale: float = 5.0  # InstaFlow's SD1.5 setting
    seed: int = 0  # pair i uses noise seed ``seed + i``; prompts drawn with this seed
    batch_size: int = 64
    shard_size: int = 4096
    dtype: str = "float32"

    def validate(self) -> None:
        if self.count < 0 or self.steps < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("pairs: count >= 0, steps, batch_size, shard_size >= 1")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"pairs.dtype {self.dtype!r} is not float32, float16 or bfloat16")


def pair_prompts(cfg: PairsConfig, num_prompts: int) -> torch.Tensor:
    """Prompt index of each pair (count,): a seeded uniform draw over the training prompts."""
    return torch.randint(0, num_prompts, (cfg.count,),
                         generator=torch.Generator().manual_seed(cfg.seed))


def pair_guidance(cfg: PairsConfig, scale_range: tuple[float, float] | None):
    """Each pair's CFG scale (count,) drawn uniformly from ``scale_range``, or ``None``."""
    if scale_range is None:
        return None
    lo, hi = scale_range
    g = torch.Generator().manual_seed(cfg.seed + 1)
    return lo + (hi - lo) * torch.rand(cfg.count, generator=g)


def write_pairs(out_dir: str | Path, sample: Sampler, num_prompts: int,
                latent_shape: tuple[int, ...], cfg: PairsConfig, meta: dict,
                log: Callable[[str], None] = print,
                scale_range: tuple[float, float] | None = None) -> dict:
    """Sample ``cfg.count`` pairs shard by shard (resuming complete shards); return the index.
    ``scale_range``: sample each pair at its own CFG scale from that range."""
    out_dir = Path(out_dir)
    key = {**meta, "count": cfg.count, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
           "guidance_range": None if scale_range is None else list(scale_range),
           "seed": cfg.seed, "dtype": cfg.dtype, "latent_shape": list(latent_shape)}
    prompts = pair_prompts(cfg, num_prompts)
    scales = pair_guidance(cfg, scale_range)

    def make(start: int, stop: int) -> dict[str, torch.Tensor]:
        return _sample_shard(sample, prompts, scales, start, stop, latent_shape, cfg)

    def progress(k: int, stop: int) -> None:
        log(f"cache_teacher: pairs shard {k} ({stop}/{cfg.count})")

    work, shards = write_resumable_shards(out_dir, key, cfg.count, cfg.shard_size, "pairs", make,
                                          progress)
    index = {**key, "shards": shards}
    publish_shards(work, out_dir, index)
    return index


def _sample_shard(sample: Sampler, prompts: torch.Tensor, scales: torch.Tensor | None,
                  start: int, stop: int, latent_shape: tuple[int, ...],
                  cfg: PairsConfig) -> dict[str, torch.Tensor]:
    ids = torch.arange(start, stop)
    x1 = []
    for lo in range(start, stop, cfg.batch_size):
        hi = min(lo + cfg.batch_size, stop)
        z = seeded_noise([cfg.seed + i for i in range(lo, hi)], latent_shape)
        s = None if scales is None else scales[lo:hi]
        x1.append(sample(prompts[lo:hi], z, s).to("cpu", getattr(torch, cfg.dtype)))
    shard = {"prompt": prompts[start:stop].clone(), "seed": (cfg.seed + ids).long(),
             "x1": torch.cat(x1).contiguous()}
    if scales is not None:
        shard["guidance"] = scales[start:stop].float().contiguous()
    return shard


class PairCache:
    """Read access to a pair cache; every shard's hash is checked when it is opened."""

    def __init__(self, folder: str | Path, expected_prompts_sha256: str | None = None):
        self.folder = Path(folder)
        if not (self.folder / INDEX).exists():
            raise CacheError(
                f"no teacher pair cache at {self.folder}: this method trains on teacher ODE "
                "pairs. Set `cache.pairs.count` > 0 in params.yaml and run "
                "`dvc repro cache_teacher`.")
        self.index = read_json(self.folder / INDEX)
        if expected_prompts_sha256 and self.index.get("prompts_sha256") != expected_prompts_sha256:
            raise CacheError(f"pair cache {self.folder} was built for other prompts; re-run "
                             "`dvc repro cache_teacher`")
        parts = [self._load(s) for s in self.index["shards"]]
        self.prompt = torch.cat([p["prompt"] for p in parts])
        self.seed = torch.cat([p["seed"] for p in parts])
        self.x1 = torch.cat([p["x1"] for p in parts]).float()
        # each pair's CFG scale, for caches sampled over a guidance range (else None)
        self.guidance = (torch.cat([p["guidance"] for p in parts])
                         if parts and "guidance" in parts[0] else None)

    def _load(self, entry: dict) -> dict[str, torch.Tensor]:
        return load_verified_shard(self.folder, entry, "pair shard")

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    def noise(self, indices: torch.Tensor) -> torch.Tensor:
        """The exact noise x0 of pairs ``indices`` (B, C, h, w), regenerated from the seeds."""
        return seeded_noise(self.seed[indices].tolist(), tuple(self.index["latent_shape"]))
