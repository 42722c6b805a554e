"""Calibration of the miniature world's teacher: train one design, time it, measure what it follows.

    uv run python -m bench.world_teacher --set unet.steps=1500 --set text.layers=1 \
        --samples 256 --out bench/results/world-teacher.json

Trains the VAE and the UNet + text encoder of the ``world`` section of ``--params`` (default
``params.yaml``) with the ``--set`` overrides (dotted keys, YAML values), saves the teacher as a
diffusers folder, loads it back with ``StableDiffusionPipeline.from_pretrained`` and prints a table:
attribute accuracy at ``check.steps`` with CFG on ``--samples`` held-out eval captions (image i
seeded i), the same for the VAE's reconstructions of the eval renders (the floor a teacher in this
latent space can reach), and the seconds and CPU seconds of each part. ``--vae-cache DIR`` reuses a
VAE trained under the same seed, data and VAE settings. Rows are appended to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionPipeline

from components.config import from_dict, to_dict
from components.generation import latents_from_vae
from components.world.build import build_denoiser, train_autoencoder
from components.world.config import WorldConfig
from components.world.dataset import render_splits
from components.world.evaluate import sample_pipeline
from components.world.models import assemble_pipeline, save_pipeline
from components.world.render import attribute_accuracy
from components.world.train import encode_latents, reconstruct, train_unet

ROOT = Path(__file__).resolve().parents[1]


def world_config(params: Path, overrides: list[str]) -> WorldConfig:
    """The params file's ``world`` section with ``key.sub=value`` overrides applied."""
    section = yaml.safe_load(params.read_text())["world"]
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = section
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return from_dict(WorldConfig, section, "world")


def autoencoder(cfg: WorldConfig, images: torch.Tensor, reference, cache: Path | None, emit):
    """(vae, scaled latents, report), from ``cache`` when a VAE of the same settings is there."""
    key = json.dumps([cfg.seed, to_dict(cfg.data), to_dict(cfg.vae)], sort_keys=True)
    folder = cache / hashlib.sha256(key.encode()).hexdigest()[:16] if cache else None
    if folder is not None and (folder / "report.json").exists():
        vae = AutoencoderKL.from_pretrained(folder)
        latents = latents_from_vae(encode_latents(vae, images), vae)
        return vae, latents, {**json.loads((folder / "report.json").read_text()), "cached": True}
    vae, latents, report = train_autoencoder(cfg, images, reference, emit)
    if folder is not None:
        vae.save_pretrained(folder)
        (folder / "report.json").write_text(json.dumps(report))
    return vae, latents, report


def judge(parts: dict, vae, captions: list[str], cfg: WorldConfig) -> dict:
    """Attribute accuracy of the in-training models at the check's steps and guidance."""
    text, unet = parts["text_encoder"], parts["unet"]
    text.eval(), unet.eval()
    pipe = assemble_pipeline(vae, text, parts["tokenizer"], unet)
    pipe.set_progress_bar_config(disable=True)
    images = sample_pipeline(pipe, captions, cfg.check.steps, cfg.check.guidance_scale, 0)
    text.train(), unet.train()
    return attribute_accuracy(images, captions)


def calibrate(cfg: WorldConfig, samples: int, cache: Path | None, every: int) -> dict:
    """Train, save, reload and judge one teacher design; returns accuracies and timings.

    every > 0: also judge the models every ``every`` steps on the first 64 captions (a curve).
    """
    start = time.perf_counter()
    splits = render_splits(cfg.data, cfg.seed)
    train_images = torch.from_numpy(splits["train"][0])
    eval_images, captions = splits["eval"][0][:samples], splits["eval"][1][:samples]
    curve = []

    def emit(metrics, step):
        print(f"  step {step}: {metrics}", flush=True)
        if every and "unet/loss" in metrics and step % every == 0:
            curve.append({"step": step, **judge(parts, vae, captions[:64], cfg)})
            print(f"  step {step}: {curve[-1]}", flush=True)

    vae, latents, vae_report = autoencoder(
        cfg, train_images, torch.from_numpy(splits["reference"][0]), cache, emit
    )
    parts = build_denoiser(cfg, latents, splits["train"][1])
    text, unet = parts["text_encoder"], parts["unet"]
    unet_report = train_unet(
        unet, text, latents, parts["ids"], parts["empty_ids"], cfg.unet, cfg.seed, emit
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_pipeline(tmp, vae, text, parts["tokenizer"], unet)
        pipe = StableDiffusionPipeline.from_pretrained(tmp)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    images = sample_pipeline(pipe, captions, cfg.check.steps, cfg.check.guidance_scale, 0)
    sample_seconds = time.perf_counter() - t0
    recon = reconstruct(vae, torch.from_numpy(eval_images)).numpy()
    return {
        "teacher": attribute_accuracy(images, captions),
        "vae_reconstruction": attribute_accuracy(recon, captions),
        "curve": curve,
        "vae": vae_report,
        "unet": unet_report,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "sample_seconds": round(sample_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-cache", type=Path, default=None)
    parser.add_argument("--every", type=int, default=0, help="judge every N UNet steps (64)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = world_config(args.params, args.set)
    row = {"overrides": args.set, "samples": args.samples, "threads": args.threads,
           "load_average": os.getloadavg(), "machine": f"{platform.machine()}, "
           f"{os.cpu_count()} CPUs", **calibrate(cfg, args.samples, args.vae_cache, args.every)}
    keys = ("colour", "shape", "size", "position", "background", "all")
    print("| overrides | " + " | ".join(keys) + " | UNet s | UNet CPU s | total s |")
    print("|" + " --- |" * (len(keys) + 4))
    for name in ("teacher", "vae_reconstruction"):
        acc = " | ".join(f"{row[name][k]:.2f}" for k in keys)
        label = " ".join(args.set) or "(params)"
        print(f"| {name}: {label} | {acc} | {row['unet']['seconds']} | "
              f"{row['unet']['cpu_seconds']} | {row['total_seconds']} |")
    if args.out is not None:
        rows = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows + [row], indent=1))


if __name__ == "__main__":
    main()
