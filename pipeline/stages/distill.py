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

import numpy as np
import torch
from safetensors.numpy import load_file
from tqdm import tqdm

from components import distributed
from components.batches import PairBatches, PromptBatches
from components.config import to_dict
from components.embed_cache import CacheError, EmbeddingCache
from components.evaluation.fid import fid_against_statistics, inception_features
from components.evaluation.grid import image_grid, save_png
from components.evaluation.inception import load_inception
from components.evaluation.resize import Preprocess
from components.generation import (
    decode_latents,
    generate_latents,
    latent_shape,
    save_student,
    seeded_noise,
)
from components.io import atomic_dir, read_json, sha256_bytes, sha256_file, write_json
from components.methods import Teacher, get_method
from components.pair_cache import PairCache
from components.policy import TrainingPolicy
from components.teacher import load_pipeline, teacher_denoiser
from components.training import train
from pipeline import paths
from pipeline.launch import torchrun
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, require, write_resolved


def _images(pipe, student, cache: EmbeddingCache, spec, n: int, seed: int, device: str):
    """Student images of the first n cached prompts (cycled), image i seeded with seed + i."""
    cond = cache.conditioning(torch.arange(n) % len(cache)).to(device)
    z = seeded_noise([seed + i for i in range(n)], latent_shape(pipe)).to(device)
    out = []
    with torch.no_grad():
        for k in range(0, n, 64):
            latents = generate_latents(student, z[k:k + 64], cond.rows(slice(k, k + 64)), spec)
            out.append(decode_latents(pipe, latents))
    return np.concatenate(out)


def _proxy_fid(root: Path, cfg):
    """FID of ``cfg.proxy_fid_images`` student images on training prompts against the cached
    reference statistics: a cheap in-training signal (not the evaluate stage's protocol)."""
    if cfg.proxy_fid_images <= 0:
        return None
    meta = read_json(require(root / paths.REFSTATS / "meta.json", "reference_stats"))
    ref = load_file(str(root / paths.REFSTATS / "stats.safetensors"))
    net = load_inception(root / paths.TOOL_CACHE / "inception",
                         meta["feature_network"]["source"], cfg.device)
    prep = Preprocess(**meta["preprocess"])  # the reference set's own preprocessing
    return lambda images: fid_against_statistics(ref["mu"], ref["sigma"],
                                                 inception_features(images, net, 64, prep))


def _sampler(root: Path, pipe, cache: EmbeddingCache, spec, cfg, rows: list[dict]):
    """A callback writing a grid of the student's images at fixed prompts and seeds, and the
    proxy FID when enabled."""
    out = root / paths.DISTILL_OUT / "samples"
    out.mkdir(parents=True, exist_ok=True)
    fid = _proxy_fid(root, cfg)

    def on_sample(student: torch.nn.Module, step: int) -> None:
        student.eval()
        n = min(cfg.sample_prompts, len(cache))
        images = _images(pipe, student, cache, spec, n, cfg.sample_seed, cfg.device)
        save_png(image_grid(images, cols=min(n, 8), upscale=4), out / f"step-{step:07d}.png")
        if fid is not None:
            images = _images(pipe, student, cache, spec, cfg.proxy_fid_images, cfg.sample_seed,
                             cfg.device)
            rows.append({"step": step, "proxy_fid": round(fid(images), 4)})
        student.train()
    return on_sample


def _decoder(pipe):
    def decode(latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor,
                          return_dict=False)[0].float()
    return decode


def _batches(root: Path, cache: EmbeddingCache, pipe, method, cfg, prompts_sha: str):
    """Prompt batches, or teacher-pair batches for methods that train on the teacher's ODE."""
    if not method.needs_pairs:
        return PromptBatches.from_cache(cache, latent_shape(pipe), cfg.device)
    pairs = PairCache(root / paths.PAIRS, expected_prompts_sha256=prompts_sha)
    if len(pairs) == 0:
        raise CacheError(f"method {cfg.method!r} trains on teacher ODE pairs but the pair cache "
                         "is empty: set `cache.pairs.count` > 0 in params.yaml and run "
                         "`dvc repro cache_teacher`")
    return PairBatches(cache.table(), cache.null(1), pairs, latent_shape(pipe),
                       cfg.device)


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
    distributed.check_processes(cfg.processes, cfg.device)
    if cfg.processes > 1 and not distributed.launched():
        torchrun("pipeline.stages.distill", root, cfg.processes)  # this stage, N processes
        return
    # under torchrun: join the job; "cuda" becomes this process's GPU
    local = replace(cfg, device=distributed.init_from_env(cfg.device))
    is_main = distributed.context().is_main
    policy = TrainingPolicy(cfg.policy)
    method_cfg = cfg.method_config()
    torch.manual_seed(cfg.loop.seed)
    prompts_sha = read_json(require(root / paths.PROMPTS_MANIFEST, "prepare_prompts"))[
        "train_sha256"]
    cache = EmbeddingCache(root / paths.CACHE, expected_prompts_sha256=prompts_sha)
    pipe = load_pipeline(teacher_cfg, root, text_encoder=None, tokenizer=None).to(local.device)
    _, build = get_method(cfg.method)
    method = build(method_cfg, Teacher(teacher_denoiser(pipe), _decoder(pipe)), cfg.loop.steps)
    batches = _batches(root, cache, pipe, method, local, prompts_sha)
    resolved = {"teacher": to_dict(teacher_cfg), "distill": to_dict(cfg),
                "method_config": to_dict(method_cfg), "cache": cache.index["prompts_sha256"]}
    if method.needs_pairs:
        resolved["pairs"] = sha256_file(root / paths.PAIRS / "index.json")
    run_hash = sha256_bytes(json.dumps(resolved, sort_keys=True).encode())[:16]
    ckpt_dir = root / paths.CHECKPOINTS / run_hash
    for other in (root / paths.CHECKPOINTS).glob("*"):
        if other.name != run_hash:
            shutil.rmtree(other, ignore_errors=True)
    rows: list[dict] = []
    if (ckpt_dir / "losses.json").exists():
        rows = read_json(ckpt_dir / "losses.json")
    bar = tqdm(total=cfg.loop.steps, desc=f"distill ({cfg.method})", unit="step",
               disable=not is_main)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()
        if done % cfg.loop.checkpoint_every == 0:
            write_json(ckpt_dir / "losses.json", rows)

    ema = train(method, batches, cfg.loop, ckpt_dir, _loss_logger(rows),
                _sampler(root, pipe, cache, method.spec, local, rows), progress, policy)
    bar.close()
    wall = time.perf_counter() - start
    ema.copy_to(method.student())
    student = policy.full_module(method.student())  # every process gathers; rank 0 keeps it
    if is_main:
        _save(root, teacher_cfg, method.spec, student, policy, cfg, rows, wall, resolved)
    distributed.finish()


def _save(root, teacher_cfg, spec, student, policy, cfg, rows, wall, resolved) -> None:
    full = load_pipeline(teacher_cfg, root, unet=_plain_unet(student.unet).to("cpu"))
    with atomic_dir(root / paths.STUDENT) as out:
        save_student(full, spec, out, {"method": cfg.method, "teacher": teacher_cfg.model,
                                       "steps": cfg.loop.steps, "policy": policy.describe()})
    write_resolved(root / paths.DISTILL_OUT / "resolved_config.json", **{
        k: v for k, v in resolved.items() if k not in ("cache", "pairs")})
    losses = [r for r in rows if "proxy_fid" not in r]
    fids = [r for r in rows if "proxy_fid" in r]
    _write_losses(root / paths.LOSS_PLOT, losses)
    _write_losses(root / paths.PROXY_FID_PLOT, fids)
    last = {**(losses[-1] if losses else {}), **(fids[-1] if fids else {})}
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
