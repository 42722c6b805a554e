"""Stage cache_teacher: the teacher's text embeddings of every prompt and of the empty prompt,
and, when ``cache.pairs.count`` > 0, teacher ODE pairs (noise seed, guided DDIM sample) for
reflow-type methods (InstaFlow, data-free Meng et al.)."""

from __future__ import annotations

from pathlib import Path

import torch

from components.embed_cache import EmbeddingCache, write_cache
from components.generation import ddim_sample, encode_prompts, latent_shape, unconditional
from components.pair_cache import write_pairs
from components.teacher import load_pipeline, teacher_denoiser
from pipeline import paths
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, require, write_resolved


def _pair_sampler(pipe, cache: EmbeddingCache, steps: int, guidance_scale: float):
    denoiser = teacher_denoiser(pipe)
    device = pipe.unet.device

    def sample(prompt_ids: torch.Tensor, z: torch.Tensor, scales) -> torch.Tensor:
        cond = cache.conditioning(prompt_ids).to(device)
        s = guidance_scale if scales is None else scales.to(device).view(-1, 1, 1, 1)
        return ddim_sample(denoiser, z.to(device), cond, cache.null(len(prompt_ids)).to(device),
                           steps, s)
    return sample


@torch.no_grad()  # local to this stage: stages may share a process (the Prefect flow)
def run(root: Path) -> None:
    configs = load_stage(root, "cache_teacher")
    teacher, cfg = configs["teacher"], configs["cache"]
    pipe = load_pipeline(teacher, root)
    prompts = require(root / paths.TRAIN_PROMPTS, "prepare_prompts").read_text(
        encoding="utf-8").splitlines()
    index = write_cache(root / paths.CACHE, prompts,
                        lambda batch: encode_prompts(pipe, batch), cfg, teacher.model, log=log,
                        null=unconditional(pipe))
    write_resolved(root / paths.CACHE / "resolved_config.json", teacher=teacher, cache=cfg)
    log(f"cache_teacher: {index['count']} prompts in {len(index['shards'])} shard(s), "
        f"embedding shape {index['shape']}")
    cache = EmbeddingCache(root / paths.CACHE)
    pairs = cfg.pairs
    sampler = _pair_sampler(pipe, cache, pairs.steps, pairs.guidance_scale)
    meta = {"prompts_sha256": index["prompts_sha256"], "teacher": teacher.model}
    write_pairs(root / paths.PAIRS, sampler, len(cache), latent_shape(pipe), pairs, meta, log=log)
    log(f"cache_teacher: {pairs.count} teacher pairs ({pairs.steps} DDIM steps, CFG "
        f"{pairs.guidance_scale})")


def main() -> None:
    entry(run, "cache_teacher")


if __name__ == "__main__":
    main()
