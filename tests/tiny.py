"""Tiny random-weight Stable-Diffusion-format models built in code (nothing downloaded).

They exercise the real diffusers code paths (``save_pretrained`` / ``from_pretrained``, the UNet
call conventions, the VAE) in well under a second per call.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from components.generation import GeneratorSpec, save_student
from components.world.tokenizer import build_tokenizer


def tiny_pipeline(seed: int = 0, latent_size: int = 8) -> StableDiffusionPipeline:
    """A random-weight SD pipeline: 16×16 images, 4×8×8 latents, hidden size 32."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=latent_size * 2)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, latent_size: int = 8):
    """A random-weight SDXL pipeline: two text encoders (the second with a projection), a UNet
    with SDXL's "text_time" added conditioning, zeros for the empty prompt."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        transformer_layers_per_block=1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=latent_size * 2)
    config = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
              "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    text = CLIPTextModel(CLIPTextConfig(**config))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2,
                                     tokenizer=build_tokenizer(), tokenizer_2=build_tokenizer(),
                                     unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_teacher(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random teacher pipeline folder and return its path."""
    tiny_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_tiny_student(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random student folder (pipeline + ``student.json``) and return its path."""
    save_student(tiny_pipeline(seed), GeneratorSpec(), folder, {"method": "swiftbrush"})
    return Path(folder)
