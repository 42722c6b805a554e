"""Tiny random-weight flow-transformer pipelines built in code (nothing downloaded): SD3.5-style
(joint CLIP-L + CLIP-G sequence, no T5, QK RMS-norm, one dual-attention layer), FLUX.1-dev-style
(CLIP-L pooled + T5 sequence with an offline-trained T5 vocabulary, guidance embedding) and
SANA-style (a Gemma-2 encoder on an offline-trained Gemma vocabulary, masked cross-attention,
a deep-compression autoencoder, DPM-Solver on flow sigmas)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    T5Config,
    T5EncoderModel,
)

from components.networks.gemma_tokenizer import build_gemma_tokenizer
from components.networks.t5_tokenizer import build_t5_tokenizer
from components.world.tokenizer import build_tokenizer

LATENT = (16, 8, 8)
_CLIP = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
         "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def _vae(scaling: float, shift: float) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
                         scaling_factor=scaling, shift_factor=shift, use_quant_conv=False,
                         use_post_quant_conv=False)


def _t5(width: int):
    """A 2-layer T5 encoder of ``width`` on a trained 16-token vocabulary, and its tokenizer."""
    tokenizer = build_t5_tokenizer(max_length=16)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=64, d_kv=8,
                                   num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
                                   decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)), tokenizer


def tiny_sd3_pipeline(seed: int = 0, t5: bool = False) -> StableDiffusion3Pipeline:
    """SD3.5-style: 2 MMDiT layers (the first with dual attention, the last text-pre-only),
    16×8×8 latents, joint width 64, shift 3; no T5 unless ``t5`` (a 2-layer one)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=8,
        dual_attention_layers=(0,), qk_norm="rms_norm")
    text_encoder_3, tokenizer_3 = _t5(64) if t5 else (None, None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(1.5305, 0.0609),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP, projection_dim=32)),
        tokenizer=build_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP, projection_dim=32)),
        tokenizer_2=build_tokenizer(), text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev-style: 1 double + 1 single block, guidance embedding, resolution shift, a
    2-layer T5 on a trained 16-token vocabulary."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    t5, tokenizer_2 = _t5(32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(0.3611, 0.1159),
                        text_encoder=CLIPTextModel(CLIPTextConfig(**_CLIP)),
                        tokenizer=build_tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sana_pipeline(seed: int = 0) -> SanaPipeline:
    """SANA-style: 2 linear-attention blocks with masked cross-attention to a 2-layer Gemma-2
    encoder (16 tokens per prompt, after SANA's default instruction), 16×8×8 latents of a
    3-stage deep-compression autoencoder (32-pixel images, SanaPipeline's smallest size),
    DPM-Solver on flow sigmas with flow shift 3."""
    torch.manual_seed(seed)
    tokenizer = build_gemma_tokenizer(max_length=16)
    gemma = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        max_position_embeddings=1024, sliding_window=512))
    transformer = SanaTransformer2DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
        cross_attention_dim=32, caption_channels=32, sample_size=8, patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=16, attention_head_dim=8,
                        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                        encoder_block_out_channels=(8, 8, 16),
                        decoder_block_out_channels=(8, 8, 16),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                        encoder_qkv_multiscales=((),) * 3, decoder_qkv_multiscales=((),) * 3,
                        decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=vae,
                        transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
