"""Bootstrap of the miniature world: render the splits, train the teacher, save both atomically.

The teacher is the family ``world.teacher`` names: ``unet``, a ``StableDiffusionPipeline`` (UNet
and CLIP text encoder, ε-prediction on SD's VP schedule), or ``sd3``, a
``StableDiffusion3Pipeline`` (MMDiT transformer and SD3's three text encoders at world size,
flow matching on a shifted rectified-flow schedule). Both share the world's VAE, trained first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline

from components.io import atomic_dir
from components.world.config import WorldConfig
from components.world.dataset import SPLITS, render_splits, split_summary
from components.world.evaluate import teacher_accuracy
from components.world.export import write_split
from components.world.models import (
    assemble_pipeline,
    assemble_sd3_pipeline,
    build_sd3_parts,
    build_text_encoder,
    build_unet,
    build_vae,
)
from components.world.render import chance_levels
from components.world.tokenizer import build_tokenizer
from components.world.train import (
    encode_latents,
    reconstruction_psnr,
    train_sd3,
    train_unet,
    train_vae,
)


def _metric_logger(log: Callable[[str], None]) -> Callable[[dict, int], None]:
    def emit(metrics: dict, step: int) -> None:
        log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    return emit


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (N, 77), padded exactly as StableDiffusionPipeline pads prompts."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_autoencoder(cfg: WorldConfig, images: torch.Tensor, reference: torch.Tensor, emit):
    """The VAE on uint8 (N, H, W, 3) training images, scaled so that latents have unit std."""
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.vae, cfg.data.image_size)
    report = train_vae(vae, images, cfg.vae, cfg.seed, emit)
    report.update(reconstruction_psnr(vae, reference))
    latents = encode_latents(vae, images)
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    report["scaling_factor"] = scale
    return vae, latents * scale, report


def check_fits(tokenizer, captions: list[str], limit: int, key: str) -> None:
    """Every caption fits ``limit`` tokens of ``tokenizer``, else one error naming ``key``."""
    longest = max(len(ids) for ids in tokenizer(captions).input_ids)
    if longest > limit:
        raise ValueError(f"captions need {longest} tokens but {key} is {limit}; raise it to at "
                         f"least {longest}")


def build_denoiser(cfg: WorldConfig, latents: torch.Tensor, captions: list[str]) -> dict:
    """Untrained tokenizer, text encoder and UNet, plus the token ids of ``captions`` (N, L)
    and of the empty prompt (L,), for latents (N, C, h, w)."""
    tokenizer = build_tokenizer(cfg.text.max_length)
    unique = sorted(set(captions))
    check_fits(tokenizer, unique, cfg.text.max_length, "world.text.max_length")
    unique_ids = tokenize(tokenizer, unique)
    index = {c: i for i, c in enumerate(unique)}
    torch.manual_seed(cfg.seed + 1)
    return {
        "tokenizer": tokenizer,
        "text_encoder": build_text_encoder(cfg.text, len(tokenizer)),
        "unet": build_unet(cfg.unet, latents.shape[-1], cfg.vae.latent_channels, cfg.text.hidden),
        "ids": unique_ids[torch.tensor([index[c] for c in captions])],
        "empty_ids": tokenize(tokenizer, [""])[0],
    }


def train_denoiser(cfg: WorldConfig, latents: torch.Tensor, captions: list[str], emit):
    """Text encoder + UNet on scaled latents (N, C, h, w); returns (tokenizer, text, unet, report)."""
    parts = build_denoiser(cfg, latents, captions)
    text, unet = parts["text_encoder"], parts["unet"]
    report = train_unet(
        unet, text, latents, parts["ids"], parts["empty_ids"], cfg.unet, cfg.seed, emit
    )
    return parts["tokenizer"], text, unet, report


def train_teacher(
    cfg: WorldConfig,
    train_images: np.ndarray,
    train_captions: list[str],
    reference_images: np.ndarray,
    log: Callable[[str], None],
):
    """Train the VAE, then the ``world.teacher`` family's denoiser and text encoders; returns
    (the teacher pipeline, report)."""
    emit = _metric_logger(log)
    images = torch.from_numpy(train_images)
    vae, latents, vae_report = train_autoencoder(
        cfg, images, torch.from_numpy(reference_images), emit
    )
    log(f"vae: {vae_report}")
    if cfg.teacher == "sd3":
        torch.manual_seed(cfg.seed + 1)
        parts = build_sd3_parts(cfg.sd3, cfg.vae.latent_channels, latents.shape[-1],
                                train_captions)
        for key, name in (("max_length", "tokenizer"), ("t5_length", "tokenizer_3")):
            check_fits(parts[name], sorted(set(train_captions)), getattr(cfg.sd3, key),
                       f"world.sd3.{key}")
        pipe = assemble_sd3_pipeline(vae, parts, cfg.sd3.shift)
        report = train_sd3(pipe, latents, train_captions, cfg.sd3, cfg.seed, emit)
        log(f"sd3: {report}")
        return pipe, {"vae": vae_report, "sd3": report}
    tokenizer, text_encoder, unet, unet_report = train_denoiser(cfg, latents, train_captions, emit)
    log(f"unet: {unet_report}")
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet)
    return pipe, {"vae": vae_report, "unet": unet_report}


def build_world(
    cfg: WorldConfig,
    data_dir: str | Path,
    teacher_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict:
    """Render all splits to ``data_dir/<split>/``, train and save the teacher to ``teacher_dir``.

    Both folders are written atomically. Returns a report: timings, losses, VAE PSNR, caption
    split counts, and attribute accuracy of teacher samples on eval captions with chance levels.
    """
    start = time.perf_counter()
    splits = render_splits(cfg.data, cfg.seed)
    report = {"splits": split_summary(splits, cfg.data)}
    with atomic_dir(data_dir) as tmp:
        for name in SPLITS:
            write_split(tmp / name, *splits[name])
    report["render_seconds"] = round(time.perf_counter() - start, 1)
    log(f"rendered {report['splits']} in {report['render_seconds']} s")

    teacher, trained = train_teacher(cfg, *splits["train"], splits["reference"][0], log)
    report.update(trained, teacher=cfg.teacher)
    with atomic_dir(teacher_dir) as tmp:
        teacher.save_pretrained(tmp)
    report["train_seconds"] = round(time.perf_counter() - start, 1)

    pipe = DiffusionPipeline.from_pretrained(teacher_dir)  # the saved folder, as users load it
    captions = splits["eval"][1][: cfg.check.n_samples]
    settings = {"cfg": (cfg.check.steps, cfg.check.guidance_scale), "one_step": (1, 1.0)}
    report["accuracy"] = teacher_accuracy(pipe, captions, settings, cfg.seed)
    report["chance"] = chance_levels(cfg.data.space)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    log(f"accuracy {report['accuracy']} (chance {report['chance']})")
    return report
