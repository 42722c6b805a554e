"""FLUX.1 (``FluxTransformer2DModel``) behind the ``Denoiser`` protocol.

Call conventions (diffusers' ``FluxPipeline``): latents (B, 16, h, w) are packed into 2×2 patches,
(B, hw/4, 64), with image ids (hw/4, 3) = (0, row, column) of each patch and text ids (L, 3) of
zeros; ``timestep`` is σ itself (the transformer scales it by 1000); ``encoder_hidden_states`` is
T5-XXL's sequence (B, L, 4096) and ``pooled_projections`` CLIP-L's pooled embedding (B, 768).
The output is the packed flow velocity ``u = ε − x0``, unpacked here, so methods see latents.
The schedule shifts by resolution (``use_dynamic_shifting``): it is built for one latent size.

Guidance. FLUX.1-dev is guidance-distilled (``guidance_embeds``): it has no true CFG; the CFG
scale s is an input (``guidance``, default 1: the plain conditional model), so a guided
prediction is one call (``embedded_guidance``; ``components.diffusion.guided``). FLUX.1-schnell
has no guidance input; a w-conditioned copy of it (Meng et al.) adds a zero-initialised
projection of the w embedding to the pooled projection, as the SD3 adapter does.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from components.networks import zero_w_projection
from components.schedules import FlowSchedule
from components.teacher import TextConditioning


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, hw/4, 4C): 2×2 patches, channels-major within a patch."""
    B, C, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even sides, got {h}×{w}")
    x = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents``: (B, hw/4, 4C) → (B, C, h, w)."""
    B, _, D = x.shape
    x = x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(hw/4, 3) position ids of the packed patches: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxDenoiser(torch.nn.Module):
    """A ``FluxTransformer2DModel`` as ``(x_t, t, cond, guidance=None) -> u`` on unpacked
    latents; runs in ``compute_dtype``, returns fp32."""

    prediction_type = "flow"

    def __init__(self, transformer: torch.nn.Module, schedule: FlowSchedule,
                 compute_dtype: torch.dtype | None = None, w_dim: int = 0):
        super().__init__()
        self.transformer = transformer
        self.schedule = schedule
        self.compute_dtype = compute_dtype
        self.embedded_guidance = bool(transformer.config.guidance_embeds)
        self.w_proj = None
        if w_dim and not self.embedded_guidance:
            self.w_proj = zero_w_projection(transformer, w_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning,
                timestep_cond: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.compute_dtype or next(self.transformer.parameters()).dtype
        B, _, h, w = x_t.shape
        if guidance is not None and not self.embedded_guidance:
            raise ValueError("this FLUX transformer has no guidance input (guidance_embeds)")
        if self.embedded_guidance:
            guidance = (torch.ones(B, device=x_t.device) if guidance is None
                        else guidance.to(x_t.device).expand(B)).to(dtype)
        pooled = cond.pooled.to(dtype)
        if self.w_proj is not None and timestep_cond is not None:
            pooled = pooled + self.w_proj(timestep_cond.to(self.w_proj.weight.dtype)).to(dtype)
        sigma = self.schedule.sigma(t.to(x_t.device)).expand(B).to(dtype)
        text = cond.text.to(dtype)
        out = self.transformer(
            hidden_states=pack_latents(x_t.to(dtype)), timestep=sigma, guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=image_ids(h, w, x_t.device, dtype), return_dict=False)[0]
        return unpack_latents(out, h, w).float()

    def with_w_embedding(self, w_dim: int) -> FluxDenoiser:
        """A w-conditioned copy: FLUX.1-dev's own guidance input (w enters as s = 1 + w, see
        ``components.diffusion.w_conditioning``), else a zero-initialised w projection."""
        return FluxDenoiser(copy.deepcopy(self.transformer), self.schedule, self.compute_dtype,
                            w_dim)


def flux_denoiser(pipe: Any, compute_dtype: torch.dtype | None = None,
                  latent_hw: tuple[int, int] | None = None) -> FluxDenoiser:
    """The pipeline's transformer with the flow schedule of latents ``latent_hw`` (default:
    the pipeline's native resolution), shifted as its scheduler config says."""
    if latent_hw is None:
        side = pipe.default_sample_size
        latent_hw = (side, side)
    seq_len = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    schedule = FlowSchedule.from_scheduler(pipe.scheduler, image_seq_len=seq_len)
    return FluxDenoiser(pipe.transformer, schedule, compute_dtype)


def t5_length(pipe: Any) -> int:
    """T5 tokens per prompt: FluxPipeline's 512, or the T5 tokenizer's own maximum if shorter."""
    return min(512, pipe.tokenizer_2.model_max_length)


@torch.no_grad()
def encode_flux(pipe: Any, prompts: Sequence[str]) -> TextConditioning:
    """T5 sequence (B, L, 4096) and CLIP-L pooled embedding (B, 768) of ``prompts``."""
    device = pipe.text_encoder.device
    text, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                         max_sequence_length=t5_length(pipe))
    return TextConditioning(text.float(), pooled.float())
