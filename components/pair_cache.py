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
last complete shard); the finished folder replaces ``<dir>`` by rename (``components.shards``).
Readers get a batch's rows at a time from memory-mapped shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from components.generation import seeded_noise
from components.io import CacheError, read_cache_index
from components.shards import ShardedTable, write_table

INDEX = "index.json"
# (prompt ids (n,), z (n, C, h, w), CFG scales (n,) or None for the fixed scale) -> x1
Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class PairsConfig:
    """``params.yaml: cache.pairs``: how many teacher pairs, and how they are sampled."""

    count: int = 0  # 0: no pairs (methods that need them stop with a clear error)
    steps: int = 25  # teacher DDIM steps
    guidance_scale: float = 5.0  # InstaFlow's SD1.5 setting
    # [lo, hi]: one scale per pair, for methods that train each pair at its own guidance
    # (Meng et al.: 1 + w over its w range); other methods always get ``guidance_scale``
    guidance_range: tuple[float, ...] = ()
    seed: int = 0  # pair i uses noise seed ``seed + i``; prompts drawn with this seed
    batch_size: int = 64
    shard_size: int = 4096
    dtype: str = "float32"

    def validate(self) -> None:
        if self.count < 0 or self.steps < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("pairs: count >= 0, steps, batch_size, shard_size >= 1")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"pairs.dtype {self.dtype!r} is not float32, float16 or bfloat16")
        r = self.guidance_range
        if r and (len(r) != 2 or not 0 <= r[0] <= r[1]):
            raise ValueError(f"pairs.guidance_range must be [] or [lo, hi] with 0 <= lo <= hi, "
                             f"got {list(r)}")


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
    """Sample ``cfg.count`` pairs shard by shard (resuming complete shards; split over the
    processes of a ``torch.distributed`` job: pair i is seeded ``cfg.seed + i`` wherever it is
    made); return the index. ``scale_range``: sample each pair at its own CFG scale from it."""
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

    return write_table(out_dir, key, cfg.count, cfg.shard_size, "pairs", make, progress,
                       lambda work, shards: {**key, "shards": shards})


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
    """Lazy read access to a pair cache: rows come from memory-mapped shards when asked for, each
    shard's hash checked the first time it is opened; nothing is loaded whole."""

    def __init__(self, folder: str | Path, expected_prompts_sha256: str | None = None):
        self.folder = Path(folder)
        if not (self.folder / INDEX).exists():
            raise CacheError(
                f"no teacher pair cache at {self.folder}: this method trains on teacher ODE "
                "pairs. Set `cache.pairs.count` > 0 in params.yaml and run "
                "`dvc repro cache_teacher`.")
        self.index = read_cache_index(self.folder / INDEX)
        if expected_prompts_sha256 and self.index.get("prompts_sha256") != expected_prompts_sha256:
            raise CacheError(f"pair cache {self.folder} was built for other prompts; re-run "
                             "`dvc repro cache_teacher`")
        self._table = ShardedTable(self.folder, self.index["shards"], "pair shard")

    def __len__(self) -> int:
        return len(self._table)

    def verify(self) -> None:
        """Check every shard's hash now (once: reads do not check it again)."""
        self._table.verify()

    @property
    def opened(self) -> list[str]:
        """The shard files read so far (each hash-checked once, when first opened)."""
        return self._table.opened

    def prompts(self, indices: torch.Tensor) -> torch.Tensor:
        """The prompt index of pairs ``indices`` (B,) int64."""
        return self._table.rows("prompt", indices)

    def samples(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The teacher's ODE samples x1 of pairs ``indices`` (B, C, h, w) in ``dtype``."""
        return self._table.rows("x1", indices).to(dtype)

    def guidance(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The CFG scale each pair ``indices`` was sampled at (B,), for caches sampled over a
        guidance range; ``None`` when every pair has the index's ``guidance_scale``."""
        if self.index.get("guidance_range") is None:
            return None
        return self._table.rows("guidance", indices)

    def noise(self, indices: torch.Tensor) -> torch.Tensor:
        """The exact noise x0 of pairs ``indices`` (B, C, h, w), regenerated from the seeds."""
        seeds = self._table.rows("seed", indices).tolist()
        return seeded_noise(seeds, tuple(self.index["latent_shape"]))
