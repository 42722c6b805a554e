"""Stage cache_teacher: the teacher's text embeddings of every prompt and of the empty prompt,
and, when ``cache.pairs.count`` > 0 and ``distill.method`` trains on them, teacher ODE pairs
(noise seed, guided DDIM sample) for reflow-type methods (InstaFlow, data-free Meng et al.).

The networks run on ``cache.device`` in ``cache.precision``. Under ``torchrun`` the shards of
both caches are split over the processes (row i is the same wherever it is made).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from components import distributed
from components.embed_cache import EmbeddingCache, PromptEncoder, open_embeddings, write_cache
from components.generation import (
    ddim_sample,
    encode_prompts,
    latent_shape,
    precision_dtype,
    unconditional,
)
from components.methods import needs_pairs, pair_guidance_range
from components.networks import network_device
from components.pair_cache import write_pairs
from components.teacher import load_pipeline, teacher_denoiser
from pipeline import paths
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, require, write_resolved


def _pair_sampler(pipe, cache: EmbeddingCache | PromptEncoder, steps: int,
                  guidance_scale: float):
    denoiser = teacher_denoiser(pipe)
    device = network_device(pipe)

    def sample(prompt_ids: torch.Tensor, z: torch.Tensor, scales) -> torch.Tensor:
        cond = cache.conditioning(prompt_ids).to(device)
        s = guidance_scale if scales is None else scales.to(device).view(-1, 1, 1, 1)
        return ddim_sample(denoiser, z.to(device), cond, cache.null(len(prompt_ids)).to(device),
                           steps, s)
    return sample


@torch.no_grad()  # local to this stage: stages may share a process (the Prefect flow)
def run(root: Path) -> None:
    configs = load_stage(root, "cache_teacher")
    teacher, cfg, method = configs["teacher"], configs["cache"], configs["distill.method"]
    device = distributed.init_from_env(cfg.device)
    pipe = load_pipeline(teacher, root, precision_dtype(cfg.precision)).to(device)
    prompts = require(root / paths.TRAIN_PROMPTS, "prepare_prompts").read_text(
        encoding="utf-8").splitlines()
    def encode(batch):
        return encode_prompts(pipe, batch)

    index = write_cache(root / paths.CACHE, prompts, encode, cfg, teacher.model, log=log,
                        null=unconditional(pipe))
    write_resolved(root / paths.CACHE / "resolved_config.json", teacher=teacher, cache=cfg)
    held = (f"in {len(index['shards'])} shard(s)" if cfg.text_embeddings == "disk" else
            "to encode on the fly in distill (cache.text_embeddings: on_the_fly)")
    log(f"cache_teacher: {index['count']} prompts {held}, embedding shape {index['shape']}")
    cache = open_embeddings(root / paths.CACHE, encoder=lambda: (prompts, encode))
    pairs = cfg.pairs
    if pairs.count and not needs_pairs(method):
        log(f"cache_teacher: no teacher pairs: method {method!r} does not train on them "
            f"(`cache.pairs.count: {pairs.count}` applies to instaflow and meng)")
        pairs = replace(pairs, count=0)
    # one CFG scale per pair for methods that train each pair at its own guidance (Meng et al.)
    per_pair = pair_guidance_range(method) is not None and bool(pairs.guidance_range)
    scale_range = tuple(pairs.guidance_range) if per_pair else None
    sampler = _pair_sampler(pipe, cache, pairs.steps, pairs.guidance_scale)
    meta = {"prompts_sha256": index["prompts_sha256"], "teacher": teacher.model}
    write_pairs(root / paths.PAIRS, sampler, len(cache), latent_shape(pipe), pairs, meta, log=log,
                scale_range=scale_range)
    cfg_text = (f"CFG {pairs.guidance_scale}" if scale_range is None
                else f"CFG drawn per pair from {list(scale_range)}")
    log(f"cache_teacher: {pairs.count} teacher pairs ({pairs.steps} DDIM steps, {cfg_text})")
    distributed.finish()


def main() -> None:
    entry(run, "cache_teacher")


if __name__ == "__main__":
    main()
