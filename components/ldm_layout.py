"""A diffusers SD1.x / SDXL pipeline's weights in the original (CompVis LDM / Stability) single-file
layout that ComfyUI and A1111 load.

diffusers 0.42 converts that layout *to* diffusers (``loaders.single_file_utils``, what
``from_single_file`` runs) but ships no converter back, so this module implements the established
mapping, the inverse of those functions, reusing their fixed-name table
(``DIFFUSERS_TO_LDM_MAPPING``). Key families of the checkpoint:

- UNet ``model.diffusion_model.*``: ``input_blocks.k`` (k = 1 + i (L + 1) + j for resnet / attention
  j of down block i, L = ``layers_per_block``; ``input_blocks.(i + 1)(L + 1).0.op`` its
  downsampler), ``middle_block.{0,1,2}``, ``output_blocks.i (L + 1) + j`` (the upsampler sits
  after the last one's resnet and attention), resnets with ``in_layers`` / ``emb_layers`` /
  ``out_layers`` / ``skip_connection``; attention blocks keep diffusers' inner names.
- VAE ``first_stage_model.*``: ``down.i.block.j``, ``up.(n − 1 − i).block.j`` (reversed),
  ``mid.block_1/2``, ``mid.attn_1`` with 1×1-conv ``q/k/v/proj_out``, ``nin_shortcut``.
- Text encoders: SD1.x ``cond_stage_model.transformer.*`` (transformers' CLIP names); SDXL
  ``conditioner.embedders.0.transformer.*`` (CLIP-L, the same) and ``conditioner.embedders.1.model.*``
  (OpenCLIP bigG: fused ``in_proj`` q/k/v, ``resblocks``, a transposed ``text_projection``).

Every tensor is mapped or the conversion fails naming the key: nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SDXL_TEXT = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                  ("to_out.0", "proj_out"))
_OPEN_CLIP = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
              ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


class LayoutError(ValueError):
    """A weight has no place in the original single-file layout."""


def _fixed(table: dict[str, str]) -> dict[str, str]:
    return dict(table)


def _unet_blocks(state: dict, layers: int, down: int) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is a resnet) for every block of the UNet."""
    out: list[tuple[str, str, bool]] = []
    for i in range(down):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            out += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True),
                    (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False)]
        out.append((f"down_blocks.{i}.downsamplers.0.conv.",
                    f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", False))
    out += [("mid_block.resnets.0.", "middle_block.0.", True),
            ("mid_block.attentions.0.", "middle_block.1.", False),
            ("mid_block.resnets.1.", "middle_block.2.", True)]
    for i in range(down):
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            out += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True),
                    (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False)]
        attention = any(key.startswith(f"up_blocks.{i}.attentions.") for key in state)
        last = i * (layers + 1) + layers
        out.append((f"up_blocks.{i}.upsamplers.0.conv.",
                    f"output_blocks.{last}.{2 if attention else 1}.conv.", False))
    return out


def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str:
    for new, old in pairs:
        key = key.replace(new, old)
    return key


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the original layout (no prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise LayoutError(f"the original UNet layout has one layers_per_block for every block; "
                          f"this UNet has {layers}")
    fixed = {**MAP["unet"]["layers"], **MAP["unet"]["addition_embed_type"]}
    if config.get("class_embed_type") in ("timestep", "projection"):
        fixed.update(MAP["unet"]["class_embed_type"])
    blocks = _unet_blocks(state, layers, len(config["down_block_types"]))
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        match = next(((d, o, r) for d, o, r in blocks if key.startswith(d)), None)
        if match is None:
            raise LayoutError(f"UNet weight {key!r} has no name in the original layout")
        d, o, resnet = match
        rest = key[len(d):]
        out[o + (_rename(rest, _RESNET) if resnet else rest)] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original layout (no prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    n = len(config["up_block_types"])
    pairs = []
    for i in range(len(config["down_block_types"])):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")]
    for i in range(n):
        pairs += [(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")]
    out = {}
    for key, value in state.items():
        if key in MAP["vae"]:
            out[MAP["vae"][key]] = value
        elif ".mid_block.attentions.0." in key:
            head, rest = key.split(".mid_block.attentions.0.")
            value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value  # 1×1 conv
            out[f"{head}.mid.attn_1.{_rename(rest, _VAE_ATTENTION)}"] = value
        elif (new := _rename(key, pairs)) != key:
            out[new.replace("conv_shortcut", "nin_shortcut")] = value
        else:
            raise LayoutError(f"VAE weight {key!r} has no name in the original layout")
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict (SDXL's second encoder) in
    OpenCLIP's layout (no prefix): q/k/v fused into ``in_proj``, the projection transposed."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    fixed = MAP["openclip"]["layers"]
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out[fixed[key]] = value.T.contiguous()
        elif key in fixed:
            out[fixed[key]] = value
        elif key.startswith("text_model.encoder.layers."):
            layer, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            block = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj",
                                                                         "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault((block, kind), {})[proj] = value
            else:
                out[block + _rename(rest, _OPEN_CLIP)] = value
        else:
            raise LayoutError(f"text encoder weight {key!r} has no name in OpenCLIP's layout")
    for (block, kind), parts in qkv.items():
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"],
                                                        parts["v_proj"]])
    return out


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _text_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights under transformers' ``text_model.`` names (transformers
    >= 5.6 stores ``CLIPTextModel`` without that wrapper; checkpoints keep it)."""
    def name(key: str) -> str:
        keep = key.startswith(("text_model.", "text_projection."))
        return key if keep else f"text_model.{key}"
    return {name(k): v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet, VAE, text encoder(s)) as one original-layout state dict: SD1.x
    (one CLIP text encoder) or SDXL (CLIP-L and OpenCLIP bigG)."""
    state = _prefixed(UNET, unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(_prefixed(VAE, vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)))
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(_prefixed(SDXL_TEXT, _text_state(pipe.text_encoder)))
        state.update(_prefixed(SDXL_TEXT_2, open_clip_to_ldm(_text_state(pipe.text_encoder_2))))
    elif type(pipe.text_encoder).__name__ == "CLIPTextModel":
        state.update(_prefixed(SD1_TEXT, _text_state(pipe.text_encoder)))
    else:
        raise LayoutError(f"a single-file checkpoint is written for SD1.x and SDXL pipelines; this "
                          f"one's text encoder is {type(pipe.text_encoder).__name__}")
    return {k: v.detach().contiguous() for k, v in state.items()}
