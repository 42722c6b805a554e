"""The real SD3.5 Medium, SD3.5 Large, FLUX.1-dev and SANA 1.6B / 0.6B architectures, written as
configs (no download), and random-weight pipelines built from them.

Each config holds the values of the released ``transformer/config.json`` (and text encoders',
VAE's and scheduler's) of ``stabilityai/stable-diffusion-3.5-medium``,
``stabilityai/stable-diffusion-3.5-large``, ``black-forest-labs/FLUX.1-dev`` and
``Efficient-Large-Model/Sana_1600M_1024px_diffusers`` / ``Sana_600M_1024px_diffusers`` (the
SANA transformer sizes of diffusers' conversion script, Gemma-2-2B as the text encoder, the
``dc-ae-f32c32-sana`` deep-compression autoencoder, DPM-Solver on flow sigmas, flow shift 3). With
``divisor > 1`` every width is divided by it (head widths, text widths, embedding sizes) while the
topology stays: depths, head counts, dual-attention layers, QK norm, guidance embedding,
conditioning inputs. The T5 tokenizer of a built pipeline is trained offline on a small corpus
(``components.networks.t5_tokenizer``); its ids index the real 32,128-row T5 embedding; the
Gemma tokenizer of a SANA pipeline likewise (``components.networks.gemma_tokenizer``), indexing
Gemma-2's real 256,000-row embedding.
"""

from __future__ import annotations

from typing import Any

import torch

FLOW_ARCHS = ("sd35m", "sd35l", "flux1", "sana", "sana600m")
SANA_ARCHS = ("sana", "sana600m")
FLOW_DIVISORS = (1, 2, 4, 8, 16)
_T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64,
           "num_layers": 24, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
           "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
# (hidden, intermediate, layers, heads, activation, projection)
_CLIP = {"clip-l": (768, 3072, 12, 12, "quick_gelu", 768),
         "clip-g": (1280, 5120, 32, 20, "gelu", 1280)}
# Gemma-2-2B (SANA's text encoder, the decoder of gemma-2-2b-it)
_GEMMA2_2B = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
              "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
              "head_dim": 256, "query_pre_attn_scalar": 256, "max_position_embeddings": 8192,
              "sliding_window": 4096, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
# SANA transformers: (self-attention heads of width 32, cross-attention heads, their width, layers)
_SANA = {"sana": (70, 20, 112, 20), "sana600m": (36, 16, 72, 28)}


def _check(arch: str, divisor: int) -> None:
    if arch not in FLOW_ARCHS:
        raise ValueError(f"unknown flow architecture {arch!r}; valid: {', '.join(FLOW_ARCHS)}")
    if divisor not in FLOW_DIVISORS:
        raise ValueError(f"divisor must be one of {FLOW_DIVISORS}, got {divisor}")


def _rope_axes(head_dim: int, divisor: int) -> tuple[int, int, int]:
    """FLUX's rotary axes (16, 56, 56) scaled to ``head_dim``; each stays even."""
    a = max(2, 16 // divisor)
    b = (head_dim - a) // 2
    if b % 2:
        a, b = a + 2, b - 1
    return (a, b, b)


def transformer_config(arch: str, divisor: int = 1) -> dict[str, Any]:
    """``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` / ``SanaTransformer2DModel``
    kwargs."""
    _check(arch, divisor)
    d = divisor
    if arch in SANA_ARCHS:
        heads, cross_heads, cross_head, layers = _SANA[arch]
        head = 32 // d
        return {"in_channels": 32, "out_channels": 32, "num_attention_heads": heads,
                "attention_head_dim": head, "num_layers": layers,
                "num_cross_attention_heads": cross_heads,
                "cross_attention_head_dim": cross_head // d,
                "cross_attention_dim": heads * head, "caption_channels": 2304 // d,
                "mlp_ratio": 2.5, "attention_bias": False, "sample_size": 32, "patch_size": 1,
                "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": None}
    if arch == "flux1":
        head = 128 // d
        return {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                "attention_head_dim": head, "num_attention_heads": 24,
                "joint_attention_dim": 4096 // d, "pooled_projection_dim": 768 // d,
                "guidance_embeds": True, "axes_dims_rope": _rope_axes(head, d)}
    large = arch == "sd35l"
    heads, head = (38 if large else 24), 64 // d
    return {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": 38 if large else 24, "attention_head_dim": head,
            "num_attention_heads": heads, "joint_attention_dim": 4096 // d,
            "caption_projection_dim": heads * head, "pooled_projection_dim": 2048 // d,
            "pos_embed_max_size": 192 if large else 384, "qk_norm": "rms_norm",
            "dual_attention_layers": () if large else tuple(range(13))}


def text_configs(arch: str, divisor: int = 1) -> dict[str, dict[str, Any]]:
    """Text encoder configs by pipeline slot (``text_encoder``, ``text_encoder_2``, …)."""
    _check(arch, divisor)
    d = divisor
    if arch in SANA_ARCHS:
        g = _GEMMA2_2B
        return {"text_encoder": {**g, "architectures": ["Gemma2Model"],
                                 "hidden_size": g["hidden_size"] // d,
                                 "intermediate_size": g["intermediate_size"] // d,
                                 "head_dim": g["head_dim"] // d,
                                 "query_pre_attn_scalar": g["head_dim"] // d}}
    names = ("clip-l", "clip-g") if arch != "flux1" else ("clip-l",)
    out = {}
    for slot, name in zip(("text_encoder", "text_encoder_2"), names):
        hidden, inter, layers, heads, act, proj = _CLIP[name]
        out[slot] = {"vocab_size": 49408, "hidden_size": hidden // d,
                     "intermediate_size": inter // d, "num_hidden_layers": layers,
                     "num_attention_heads": heads if d == 1 else max(1, heads // 4),
                     "max_position_embeddings": 77, "hidden_act": act,
                     "projection_dim": proj // d, "bos_token_id": 49406, "eos_token_id": 49407,
                     "pad_token_id": 49407 if name == "clip-l" else 0}
    t5 = {**_T5_XXL, "d_model": 4096 // d, "d_ff": 10240 // d,
          "num_heads": 64 if d == 1 else 64 // d}
    out["text_encoder_2" if arch == "flux1" else "text_encoder_3"] = t5
    return out


def vae_config(arch: str, divisor: int = 1) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs: the 16-channel VAE of SD3 and FLUX (their own scale/shift);
    for SANA ``AutoencoderDC`` kwargs (f32c32: 32× downsampling to 32 channels)."""
    _check(arch, divisor)
    if arch in SANA_ARCHS:
        widths = tuple(w // divisor for w in (128, 256, 512, 512, 1024, 1024))
        blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
        scales = ((),) * 3 + ((5,),) * 3
        return {"in_channels": 3, "latent_channels": 32, "attention_head_dim": 32 // divisor,
                "encoder_block_types": blocks, "decoder_block_types": blocks,
                "encoder_block_out_channels": widths, "decoder_block_out_channels": widths,
                "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
                "decoder_layers_per_block": (3,) * 6, "encoder_qkv_multiscales": scales,
                "decoder_qkv_multiscales": scales, "upsample_block_type": "interpolate",
                "downsample_block_type": "Conv", "decoder_norm_types": "rms_norm",
                "decoder_act_fns": "silu", "scaling_factor": 0.41407}
    flux = arch == "flux1"
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
            "block_out_channels": tuple(w // divisor for w in (128, 256, 512, 512)),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "act_fn": "silu",
            "norm_num_groups": 32 if divisor == 1 else 8, "sample_size": 1024,
            "scaling_factor": 0.3611 if flux else 1.5305,
            "shift_factor": 0.1159 if flux else 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False}


def scheduler_config(arch: str) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` kwargs: SD3's static shift 3, FLUX's resolution
    shift (μ from 0.5 at 256 tokens to 1.15 at 4,096); SANA's ``DPMSolverMultistepScheduler``
    kwargs (flow sigmas, shift 3)."""
    _check(arch, 1)
    if arch in SANA_ARCHS:  # SANA's DPM-Solver on flow sigmas (its own sampler)
        return {"num_train_timesteps": 1000, "prediction_type": "flow_prediction",
                "use_flow_sigmas": True, "flow_shift": 3.0}
    if arch == "flux1":
        return {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096}
    return {"num_train_timesteps": 1000, "shift": 3.0}


def _transformer_class(arch: str):
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

    if arch in SANA_ARCHS:
        return SanaTransformer2DModel
    return FluxTransformer2DModel if arch == "flux1" else SD3Transformer2DModel


def count_transformer_parameters(arch: str, divisor: int = 1) -> int:
    """Parameters of the transformer, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = _transformer_class(arch)(**transformer_config(arch, divisor))
    return sum(p.numel() for p in model.parameters())


def build_flow_pipeline(arch: str, divisor: int = 1, seed: int = 0,
                        dtype: torch.dtype = torch.float32, t5: bool = True) -> Any:
    """A random-weight ``StableDiffusion3Pipeline`` (``t5=False``: without its T5 encoder, as
    SD3 can run), ``FluxPipeline`` or ``SanaPipeline``."""
    if arch in SANA_ARCHS:
        return _sana_pipeline(arch, divisor, seed, dtype)
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from components.networks.t5_tokenizer import build_t5_tokenizer
    from components.world.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    texts = text_configs(arch, divisor)
    parts: dict[str, Any] = {
        "transformer": _transformer_class(arch)(**transformer_config(arch, divisor)),
        "vae": AutoencoderKL(**vae_config(arch, divisor)),
        "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler_config(arch))}
    flux = arch == "flux1"
    clip = CLIPTextModel if flux else CLIPTextModelWithProjection
    parts["text_encoder"], parts["tokenizer"] = clip(CLIPTextConfig(**texts["text_encoder"])), \
        build_tokenizer()
    slot = "text_encoder_2" if flux else "text_encoder_3"
    t5_parts = (None, None)
    if t5 or flux:
        t5_parts = (T5EncoderModel(T5Config(**texts[slot])),
                    build_t5_tokenizer(max_length=512 if flux else 256))
    if flux:
        parts["text_encoder_2"], parts["tokenizer_2"] = t5_parts
        pipe = FluxPipeline(**parts)
    else:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**texts["text_encoder_2"]))
        parts["tokenizer_2"] = build_tokenizer()
        parts["text_encoder_3"], parts["tokenizer_3"] = t5_parts
        pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def _sana_pipeline(arch: str, divisor: int, seed: int, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    from components.networks.gemma_tokenizer import build_gemma_tokenizer

    torch.manual_seed(seed)
    gemma = {k: v for k, v in text_configs(arch, divisor)["text_encoder"].items()
             if k != "architectures"}
    pipe = SanaPipeline(
        tokenizer=build_gemma_tokenizer(), text_encoder=Gemma2Model(Gemma2Config(**gemma)),
        vae=AutoencoderDC(**vae_config(arch, divisor)),
        transformer=_transformer_class(arch)(**transformer_config(arch, divisor)),
        scheduler=DPMSolverMultistepScheduler(**scheduler_config(arch)))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
