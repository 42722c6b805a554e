"""The real Stable Diffusion 1.5, 2.1 and SDXL architectures, written as configs (no download).

Each ``*_config`` returns the keyword arguments of the diffusers / transformers class with the
values of the released checkpoints' ``config.json`` files (``stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-2-1``, ``stabilityai/stable-diffusion-xl-base-1.0``). With
``divisor > 1`` every width is divided by it (channels, text widths, embedding sizes) while the
topology stays: block types, layers per block, transformer depths, head counts, conditioning
inputs. That keeps CPU tests of the real code paths fast. ``build_pipeline`` assembles random-weight
diffusers pipelines for benchmarks and tests; tokenizers come from open_clip's bundled BPE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

ARCHS = ("sd15", "sd21", "sdxl")
DIVISORS = (1, 2, 4, 8)
_CROSS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_CROSS_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _check(arch: str, divisor: int) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {DIVISORS} (widths stay divisible by the head "
                         f"and group counts), got {divisor}")


def unet_config(arch: str, divisor: int = 1) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs (SD1.5: 859.5 M parameters; SD2.1: 865.9 M; SDXL: 2.57 B)."""
    _check(arch, divisor)
    d = divisor
    groups = 32 if d == 1 else 8
    common = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "norm_num_groups": groups, "act_fn": "silu", "flip_sin_to_cos": True,
              "freq_shift": 0, "downsample_padding": 1, "norm_eps": 1e-5}
    if arch == "sd15":
        return dict(common, sample_size=64 // d, block_out_channels=_w((320, 640, 1280, 1280), d),
                    down_block_types=_CROSS, up_block_types=_CROSS_UP, attention_head_dim=8,
                    cross_attention_dim=768 // d)
    if arch == "sd21":
        return dict(common, sample_size=96 // d, block_out_channels=_w((320, 640, 1280, 1280), d),
                    down_block_types=_CROSS, up_block_types=_CROSS_UP,
                    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024 // d,
                    use_linear_projection=True, upcast_attention=True)
    time_dim = 256 // d
    return dict(common, sample_size=128 // d, block_out_channels=_w((320, 640, 1280), d),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                cross_attention_dim=(768 + 1280) // d, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + 1280 // d)


# What tells the families apart (diffusers' defaults where a config leaves a key out). The
# sample size is left out: SD2.1 (768 px) and SD2.1-base (512 px) differ only there.
_TOPOLOGY_DEFAULTS = {"transformer_layers_per_block": 1, "use_linear_projection": False,
                      "addition_embed_type": None, "in_channels": 4, "out_channels": 4}
_TOPOLOGY = ("in_channels", "out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "block_out_channels", "attention_head_dim", "cross_attention_dim",
             "transformer_layers_per_block", "use_linear_projection", "addition_embed_type")


def identify(unet: Mapping[str, Any]) -> str | None:
    """The architecture (``sd15``, ``sd21``, ``sdxl``) whose UNet topology the UNet config
    ``unet`` has, at full width or divided by one of ``DIVISORS``; None for any other UNet."""
    def value(config: Mapping[str, Any], key: str) -> Any:
        v = config.get(key, _TOPOLOGY_DEFAULTS.get(key))
        return tuple(v) if isinstance(v, list | tuple) else v

    for arch in ARCHS:
        for divisor in DIVISORS:
            ref = unet_config(arch, divisor)
            if all(value(unet, k) == value(ref, k) for k in _TOPOLOGY):
                return arch
    return None


def vae_config(arch: str, divisor: int = 1) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs (83.7 M parameters at full size; the same network for all three)."""
    _check(arch, divisor)
    size = {"sd15": 512, "sd21": 768, "sdxl": 1024}[arch]
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": _w((128, 256, 512, 512), divisor),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "act_fn": "silu",
            "norm_num_groups": 32 if divisor == 1 else 8, "sample_size": size // divisor,
            "scaling_factor": 0.13025 if arch == "sdxl" else 0.18215,
            "force_upcast": arch == "sdxl"}


# (hidden, intermediate, layers, heads, activation, projection): CLIP ViT-L/14 (SD1.5, SDXL's
# first encoder), OpenCLIP ViT-H/14 without its last layer (SD2.1), OpenCLIP ViT-bigG/14 (SDXL).
_TEXT = {"vit-l": (768, 3072, 12, 12, "quick_gelu", 768),
         "vit-h": (1024, 4096, 23, 16, "gelu", 512),
         "vit-bigg": (1280, 5120, 32, 20, "gelu", 1280)}
_ENCODERS = {"sd15": ("vit-l",), "sd21": ("vit-h",), "sdxl": ("vit-l", "vit-bigg")}


def text_configs(arch: str, divisor: int = 1) -> list[dict[str, Any]]:
    """``CLIPTextConfig`` kwargs of each text encoder, in pipeline order."""
    _check(arch, divisor)
    out = []
    for name in _ENCODERS[arch]:
        hidden, inter, layers, heads, act, proj = _TEXT[name]
        out.append({"vocab_size": 49408, "hidden_size": hidden // divisor,
                    "intermediate_size": inter // divisor, "num_hidden_layers": layers,
                    "num_attention_heads": heads if divisor == 1 else max(1, heads // 4),
                    "max_position_embeddings": 77, "hidden_act": act,
                    "projection_dim": proj // divisor, "bos_token_id": 49406,
                    "eos_token_id": 49407, "pad_token_id": 49407 if name == "vit-l" else 0})
    return out


def scheduler_config(arch: str) -> dict[str, Any]:
    """The released pipelines' training noise schedule (SD2.1 predicts v; the others ε)."""
    _check(arch, 1)
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
            "set_alpha_to_one": False,
            "prediction_type": "v_prediction" if arch == "sd21" else "epsilon",
            "timestep_spacing": "leading"}


def count_unet_parameters(arch: str, divisor: int = 1) -> int:
    """Parameters of the UNet, counted on the meta device (no memory, well under a second)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(arch, divisor))
    return sum(p.numel() for p in unet.parameters())


def _w(widths: tuple[int, ...], divisor: int) -> tuple[int, ...]:
    return tuple(w // divisor for w in widths)


def _tokenizer(pad_with_bang: bool):
    from components.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    if pad_with_bang:  # OpenCLIP encoders (SD2.x, SDXL's second) pad with "!" (id 0)
        tok.pad_token = "!"
    return tok


def build_pipeline(arch: str, divisor: int = 1, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight ``StableDiffusionPipeline`` (sd15, sd21) or ``StableDiffusionXLPipeline``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(arch, divisor))
    vae = AutoencoderKL(**vae_config(arch, divisor))
    texts = [CLIPTextConfig(**c) for c in text_configs(arch, divisor)]
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(texts[0]), tokenizer=_tokenizer(False),
            text_encoder_2=CLIPTextModelWithProjection(texts[1]), tokenizer_2=_tokenizer(True),
            unet=unet, scheduler=EulerDiscreteScheduler(**_euler(scheduler_config(arch))))
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(texts[0]), tokenizer=_tokenizer(arch == "sd21"),
            unet=unet, scheduler=DDIMScheduler(**scheduler_config(arch)), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def _euler(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("clip_sample", "set_alpha_to_one")}
