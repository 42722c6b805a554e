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

from components.world.config import SD3Config, TextConfig, UNetConfig, VaeConfig

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


def build_sd3_parts(cfg: SD3Config, latent_channels: int, latent_side: int,
                    corpus: list[str]) -> dict:
    """Untrained parts of the world's flow teacher, named as ``StableDiffusion3Pipeline``'s
    components (all but the VAE and the scheduler): two CLIP text encoders with projections and
    their tokenizers, a T5 encoder with an offline-trained T5 tokenizer, and the MMDiT
    transformer. The joint text width is the two CLIP widths side by side, which the pipeline
    pads to T5's width: so T5 is twice a CLIP encoder's width. The T5 vocabulary is trained on
    ``corpus`` (the world's captions)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from components.networks.t5_tokenizer import build_t5_tokenizer
    from components.world.tokenizer import build_tokenizer

    width = cfg.text_hidden
    clip = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=cfg.text_layers, num_attention_heads=4,
                          max_position_embeddings=cfg.max_length, projection_dim=width,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    t5_tokenizer = build_t5_tokenizer(sorted(set(corpus)), vocab_size=256,
                                      max_length=cfg.t5_length)
    t5 = T5Config(vocab_size=len(t5_tokenizer), d_model=2 * width, d_ff=4 * width, d_kv=32,
                  num_heads=4, num_layers=cfg.text_layers, feed_forward_proj="gated-gelu",
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    tokens = latent_side // cfg.patch_size
    transformer = SD3Transformer2DModel(
        sample_size=latent_side, patch_size=cfg.patch_size, in_channels=latent_channels,
        out_channels=latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=2 * width,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * width,
        pos_embed_max_size=tokens, qk_norm="rms_norm" if cfg.qk_norm else None)
    return {"text_encoder": CLIPTextModelWithProjection(clip),
            "tokenizer": build_tokenizer(cfg.max_length),
            "text_encoder_2": CLIPTextModelWithProjection(clip),
            "tokenizer_2": build_tokenizer(cfg.max_length),
            "text_encoder_3": T5EncoderModel(t5), "tokenizer_3": t5_tokenizer,
            "transformer": transformer}


def assemble_sd3_pipeline(vae: AutoencoderKL, parts: dict, shift: float):
    """The flow teacher's parts as a ``StableDiffusion3Pipeline`` with SD3's flow-matching Euler
    scheduler at ``shift``. The world VAE has no latent shift; SD3's pipeline reads one, so it
    is recorded as 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
