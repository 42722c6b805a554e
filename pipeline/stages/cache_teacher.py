"""Stage cache_teacher: the teacher's text embeddings of every prompt and of the empty prompt."""

from __future__ import annotations

from pathlib import Path

import torch

from components.embed_cache import write_cache
from components.generation import encode_prompts
from components.teacher import load_pipeline
from pipeline import paths
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, require, write_resolved


def run(root: Path) -> None:
    configs = load_stage(root, "cache_teacher")
    teacher, cfg = configs["teacher"], configs["cache"]
    pipe = load_pipeline(teacher, root)
    prompts = require(root / paths.TRAIN_PROMPTS, "prepare_prompts").read_text(
        encoding="utf-8").splitlines()
    torch.set_grad_enabled(False)
    index = write_cache(root / paths.CACHE, prompts,
                        lambda batch: encode_prompts(pipe, batch).text, cfg, teacher.model,
                        log=log)
    write_resolved(root / paths.CACHE / "resolved_config.json", teacher=teacher, cache=cfg)
    log(f"cache_teacher: {index['count']} prompts in {len(index['shards'])} shard(s), "
        f"embedding shape {index['shape']}")


def main() -> None:
    entry(run, "cache_teacher")


if __name__ == "__main__":
    main()
