"""Builders for the teacher's parts (diffusers/transformers classes) and its pipeline folder."""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from components.world.config import TextConfig, UNetConfig, VaeConfig

# Stable Diffusion's noise schedule: scaled_linear betas 0.00085 -> 0.012 over 1000 steps
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def build_vae(cfg: VaeConfig, image_size: int) -> AutoencoderKL:
    n = len(cfg.channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(16, min(cfg.channels)),
        sample_size=image_size,
    )


def build_text_encoder(cfg: TextConfig, vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_unet(cfg: UNetConfig, sample_size: int, latent_channels: int, cross_dim: int):
    """UNet2DConditionModel with cross-attention only where ``cfg.attention`` says."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple(d.replace("Down", "Up") for d in reversed(down))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_dim,
        attention_head_dim=cfg.head_dim,
        norm_num_groups=min(32, min(cfg.channels)),
    )


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SD_SCHEDULE)


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    """The teacher's parts as a StableDiffusionPipeline with SD's DDIM scheduler settings."""
    scheduler = DDIMScheduler(
        **SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(
    folder: str | Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> None:
    """Write a folder that ``StableDiffusionPipeline.from_pretrained`` loads (DDIM, SD config)."""
    assemble_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(folder)
