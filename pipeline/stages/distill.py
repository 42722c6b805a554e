"""Stage distill: train the one-step student with the configured method.

Checkpoints live in ``checkpoints/distill/<config hash>/``: a killed run resumes from its last
checkpoint when re-run with the same params, and a run with other params starts afresh.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from components import distributed
from components.config import to_dict
from components.diffusion import NoiseSchedule
from components.embed_cache import EmbeddingCache
from components.evaluation.grid import image_grid, save_png
from components.generation import (
    decode_latents,
    latent_shape,
    one_step_x0,
    save_student,
    seeded_noise,
)
from components.io import atomic_dir, read_json, sha256_bytes, write_json
from components.methods import get_method
from components.teacher import UNetDenoiser, load_pipeline
from components.training import train
from pipeline import paths
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, require, write_resolved


def _sampler(pipe, cache: EmbeddingCache, spec, cfg, out: Path):
    """A callback writing a grid of the student's images at fixed prompts and seeds."""
    n = min(cfg.sample_prompts, len(cache))
    cond = cache.conditioning(torch.arange(n)).to(cfg.device)
    z = seeded_noise([cfg.sample_seed + i for i in range(n)], latent_shape(pipe)).to(cfg.device)
    out.mkdir(parents=True, exist_ok=True)

    def on_sample(student: torch.nn.Module, step: int) -> None:
        student.eval()
        with torch.no_grad():
            den = UNetDenoiser(student, NoiseSchedule.from_scheduler(pipe.scheduler), "epsilon")
            images = decode_latents(pipe, one_step_x0(den, z, cond, spec))
        student.train()
        save_png(image_grid(images, cols=min(n, 8), upscale=4), out / f"step-{step:07d}.png")
    return on_sample


def _loss_logger(rows: list[dict]):
    def log_metrics(metrics: dict, step: int) -> None:
        rows.append({"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}})
    return log_metrics


def _write_losses(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r} - {"step"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *keys])
        writer.writeheader()
        writer.writerows(rows)


def run(root: Path) -> None:
    configs = load_stage(root, "distill")
    teacher_cfg, cfg = configs["teacher"], configs["distill"]
    # under torchrun / accelerate launch: join the job; "cuda" becomes this process's GPU
    local = replace(cfg, device=distributed.init_from_env(cfg.device))
    is_main = distributed.context().is_main
    method_cfg = cfg.method_config()
    torch.manual_seed(cfg.loop.seed)
    prompts_sha = read_json(require(root / paths.PROMPTS_MANIFEST, "prepare_prompts"))[
        "train_sha256"]
    cache = EmbeddingCache(root / paths.CACHE, expected_prompts_sha256=prompts_sha)
    pipe = load_pipeline(teacher_cfg, root, text_encoder=None, tokenizer=None).to(local.device)
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    _, build = get_method(cfg.method)
    resolved = {"teacher": to_dict(teacher_cfg), "distill": to_dict(cfg),
                "method_config": to_dict(method_cfg), "cache": cache.index["prompts_sha256"]}
    run_hash = sha256_bytes(json.dumps(resolved, sort_keys=True).encode())[:16]
    ckpt_dir = root / paths.CHECKPOINTS / run_hash
    for other in (root / paths.CHECKPOINTS).glob("*"):
        if other.name != run_hash:
            shutil.rmtree(other, ignore_errors=True)
    method = build(method_cfg, pipe.unet, schedule)
    rows: list[dict] = []
    if (ckpt_dir / "losses.json").exists():
        rows = read_json(ckpt_dir / "losses.json")
    bar = tqdm(total=cfg.loop.steps, desc=f"distill ({cfg.method})", unit="step",
               disable=not is_main)
    samples = root / paths.DISTILL_OUT / "samples"
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()
        if done % cfg.loop.checkpoint_every == 0:
            write_json(ckpt_dir / "losses.json", rows)

    ema = train(method, cache, latent_shape(pipe), cfg.loop, ckpt_dir, _loss_logger(rows),
                _sampler(pipe, cache, method.spec, local, samples), progress, local.device)
    bar.close()
    wall = time.perf_counter() - start
    if is_main:
        _save(root, teacher_cfg, method, ema, cfg, rows, wall, resolved)
    distributed.finish()


def _save(root, teacher_cfg, method, ema, cfg, rows, wall, resolved) -> None:
    student = method.student()
    ema.copy_to(student)
    full = load_pipeline(teacher_cfg, root, unet=_plain_unet(student).to("cpu"))
    with atomic_dir(root / paths.STUDENT) as out:
        save_student(full, method.spec, out, {"method": cfg.method, "teacher": teacher_cfg.model,
                                              "steps": cfg.loop.steps})
    write_resolved(root / paths.DISTILL_OUT / "resolved_config.json", **{
        k: v for k, v in resolved.items() if k != "cache"})
    _write_losses(root / paths.LOSS_PLOT, rows)
    last = rows[-1] if rows else {}
    images_seen = cfg.loop.steps * cfg.loop.batch_size
    write_json(root / paths.DISTILL_METRICS, {"steps": cfg.loop.steps, "images_seen": images_seen,
                                              "wall_seconds": round(wall, 1),
                                              **{k: v for k, v in last.items() if k != "step"}})
    log(f"distill: {cfg.loop.steps} steps ({images_seen} images) in {wall:.0f} s; "
        f"student saved to {paths.STUDENT}")


def _plain_unet(student: torch.nn.Module) -> torch.nn.Module:
    """The student without any training wrappers, in eval mode."""
    return student.eval().requires_grad_(False)


def main() -> None:
    entry(run, "distill")


if __name__ == "__main__":
    main()
