"""A flow-transformer student's weights in the layout its family was released in, the inverse of
diffusers' single-file converters (``diffusers.loaders.single_file_utils``).

diffusers converts these layouts only towards diffusers; each function here undoes one converter
key for key: it fuses what the converter splits (q/k/v, FLUX's q/k/v + MLP ``linear1``, SANA's
k/v), swaps back the shift/scale halves it swaps, and fails on any weight it has no place for
rather than drop it. Only the transformer is written, as the released SD3 and FLUX files that
ComfyUI's "Load Diffusion Model" reads hold the denoiser alone (the text encoders and VAE load
apart); diffusers' ``<Transformer>.from_single_file`` reads all three.
"""

from __future__ import annotations

import torch
from torch import Tensor

State = dict[str, Tensor]
SUPPORTED = {"sd3": "StableDiffusion3Pipeline (Stability MMDiT)",
             "flux": "FluxPipeline (Black Forest Labs)",
             "sana": "SanaPipeline (NVlabs Sana)"}
SANA_CAPTION_TOKENS = 300  # the length of SANA's null-caption table (its model_max_length)


def _take(src: State, out: State, renames: dict[str, str]) -> None:
    """Move each diffusers module's ``weight`` and ``bias`` (those present) to its new name."""
    for ours, theirs in renames.items():
        for suffix in (".weight", ".bias"):
            if ours + suffix in src:
                out[theirs + suffix] = src.pop(ours + suffix)


def _fuse(src: State, out: State, parts: list[str], fused: str) -> None:
    """Concatenate the modules ``parts`` (weights, and biases if they have them) along the
    output axis into ``fused``: what the converter ``torch.chunk``s or ``torch.split``s."""
    for suffix in (".weight", ".bias"):
        if parts[0] + suffix in src:
            out[fused + suffix] = torch.cat([src.pop(p + suffix) for p in parts])


def _swap_halves(w: Tensor) -> Tensor:
    """diffusers' AdaLayerNormContinuous reads (scale, shift), the originals (shift, scale);
    swapping the two halves is its own inverse."""
    first, second = w.chunk(2, dim=0)
    return torch.cat([second, first])


def _blocks(src: State, prefix: str) -> range:
    return range(len({k.split(".")[1] for k in src if k.startswith(prefix)}))


def _done(src: State, family: str) -> None:
    if src:
        raise ValueError(f"the {family} single-file layout has no place for {len(src)} weights "
                         f"of this transformer (e.g. {sorted(src)[:3]}); export it as diffusers")


def sd3_to_mmdit(state: State) -> State:
    """An ``SD3Transformer2DModel`` state dict in Stability's MMDiT layout under
    ``model.diffusion_model.``: the inverse of ``convert_sd3_transformer_checkpoint_to_diffusers``
    (QK norms and SD3.5's dual-attention ``attn2`` included)."""
    src, out = dict(state), {}
    out["pos_embed"] = src.pop("pos_embed.pos_embed")
    _take(src, out, {"pos_embed.proj": "x_embedder.proj",
                     "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                     "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
                     "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
                     "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
                     "context_embedder": "context_embedder", "proj_out": "final_layer.linear"})
    for i in _blocks(src, "transformer_blocks."):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", \
            f"joint_blocks.{i}.context_block."
        pre_only = d + "attn.to_add_out.weight" not in src  # the last block: no text output
        _fuse(src, out, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], x + "attn.qkv")
        _fuse(src, out, [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
              c + "attn.qkv")
        _fuse(src, out, [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"], x + "attn2.qkv")
        _take(src, out, {d + "attn.norm_q": x + "attn.ln_q", d + "attn.norm_k": x + "attn.ln_k",
                         d + "attn.norm_added_q": c + "attn.ln_q",
                         d + "attn.norm_added_k": c + "attn.ln_k",
                         d + "attn2.norm_q": x + "attn2.ln_q", d + "attn2.norm_k": x + "attn2.ln_k",
                         d + "attn.to_out.0": x + "attn.proj", d + "attn.to_add_out": c + "attn.proj",
                         d + "attn2.to_out.0": x + "attn2.proj",
                         d + "norm1.linear": x + "adaLN_modulation.1",
                         d + "norm1_context.linear": c + "adaLN_modulation.1",
                         d + "ff.net.0.proj": x + "mlp.fc1", d + "ff.net.2": x + "mlp.fc2",
                         d + "ff_context.net.0.proj": c + "mlp.fc1",
                         d + "ff_context.net.2": c + "mlp.fc2"})
        if pre_only:  # its context norm is an AdaLayerNormContinuous, halves swapped
            for suffix in (".weight", ".bias"):
                key = c + "adaLN_modulation.1" + suffix
                out[key] = _swap_halves(out[key])
    for suffix in (".weight", ".bias"):
        out["final_layer.adaLN_modulation.1" + suffix] = _swap_halves(
            src.pop("norm_out.linear" + suffix))
    _done(src, "SD3")
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def flux_to_bfl(state: State) -> State:
    """A ``FluxTransformer2DModel`` state dict in Black Forest Labs' released layout (no
    prefix, as ``flux1-dev.safetensors``): the inverse of
    ``convert_flux_transformer_checkpoint_to_diffusers`` (``guidance_in`` when it has one)."""
    src, out = dict(state), {}
    _take(src, out, {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                     "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                     "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                     "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                     "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                     "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                     "context_embedder": "txt_in", "x_embedder": "img_in",
                     "proj_out": "final_layer.linear"})
    for i in _blocks(src, "transformer_blocks."):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _fuse(src, out, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], o + "img_attn.qkv")
        _fuse(src, out, [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
              o + "txt_attn.qkv")
        _take(src, out, {d + "norm1.linear": o + "img_mod.lin",
                         d + "norm1_context.linear": o + "txt_mod.lin",
                         d + "attn.to_out.0": o + "img_attn.proj",
                         d + "attn.to_add_out": o + "txt_attn.proj",
                         d + "ff.net.0.proj": o + "img_mlp.0", d + "ff.net.2": o + "img_mlp.2",
                         d + "ff_context.net.0.proj": o + "txt_mlp.0",
                         d + "ff_context.net.2": o + "txt_mlp.2"})
        for ours, theirs in (("attn.norm_q", "img_attn.norm.query_norm"),
                             ("attn.norm_k", "img_attn.norm.key_norm"),
                             ("attn.norm_added_q", "txt_attn.norm.query_norm"),
                             ("attn.norm_added_k", "txt_attn.norm.key_norm")):
            out[o + theirs + ".scale"] = src.pop(d + ours + ".weight")
    for i in _blocks(src, "single_transformer_blocks."):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        # linear1 is q, k, v and the MLP's input projection in one matrix
        _fuse(src, out, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"],
              o + "linear1")
        _take(src, out, {d + "norm.linear": o + "modulation.lin", d + "proj_out": o + "linear2"})
        out[o + "norm.query_norm.scale"] = src.pop(d + "attn.norm_q.weight")
        out[o + "norm.key_norm.scale"] = src.pop(d + "attn.norm_k.weight")
    for suffix in (".weight", ".bias"):
        out["final_layer.adaLN_modulation.1" + suffix] = _swap_halves(
            src.pop("norm_out.linear" + suffix))
    _done(src, "FLUX")
    return out


def sana_to_original(state: State, num_patches: int) -> State:
    """A ``SanaTransformer2DModel`` state dict in NVlabs' Sana layout (no prefix): the inverse of
    ``convert_sana_transformer_to_diffusers``. The two tensors that converter reads and discards
    are written as zeros: ``pos_embed`` (1, ``num_patches``, D), which is zeros in Sana's own
    models without positional embedding, and the null-caption table ``y_embedder.y_embedding``
    (300, caption channels), used only for caption dropout in training."""
    src, out = dict(state), {}
    width = src["patch_embed.proj.weight"].shape[0]
    caption = src["caption_projection.linear_1.weight"].shape[1]
    dtype = src["patch_embed.proj.weight"].dtype
    out["pos_embed"] = torch.zeros(1, num_patches, width, dtype=dtype)
    out["y_embedder.y_embedding"] = torch.zeros(SANA_CAPTION_TOKENS, caption, dtype=dtype)
    out["final_layer.scale_shift_table"] = src.pop("scale_shift_table")
    _take(src, out, {"patch_embed.proj": "x_embedder.proj",
                     "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
                     "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
                     "time_embed.linear": "t_block.1",
                     "caption_projection.linear_1": "y_embedder.y_proj.fc1",
                     "caption_projection.linear_2": "y_embedder.y_proj.fc2",
                     "caption_norm": "attention_y_norm", "proj_out": "final_layer.linear"})
    for i in _blocks(src, "transformer_blocks."):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = src.pop(d + "scale_shift_table")
        _fuse(src, out, [d + "attn1.to_q", d + "attn1.to_k", d + "attn1.to_v"], o + "attn.qkv")
        _fuse(src, out, [d + "attn2.to_k", d + "attn2.to_v"], o + "cross_attn.kv_linear")
        _take(src, out, {d + "attn1.to_out.0": o + "attn.proj",
                         d + "attn2.to_q": o + "cross_attn.q_linear",
                         d + "attn2.to_out.0": o + "cross_attn.proj",
                         d + "ff.conv_inverted": o + "mlp.inverted_conv.conv",
                         d + "ff.conv_depth": o + "mlp.depth_conv.conv",
                         d + "ff.conv_point": o + "mlp.point_conv.conv"})
    _done(src, "SANA")
    return out


def transformer_to_original(family: str, transformer: torch.nn.Module) -> State:
    """The transformer of a ``family`` pipeline (``components.networks.PIPELINES``) in its
    released single-file layout; any other family is a ValueError naming the supported ones."""
    if family not in SUPPORTED:
        raise ValueError(f"no single-file layout for a {family} transformer: the single-file "
                         f"export supports UNet pipelines and {', '.join(SUPPORTED.values())}; "
                         "export it with `--format diffusers`")
    state = {k: v.detach() for k, v in transformer.state_dict().items()}
    if family == "sd3":
        return sd3_to_mmdit(state)
    if family == "flux":
        return flux_to_bfl(state)
    config = transformer.config
    return sana_to_original(state, (config.sample_size // config.patch_size) ** 2)
