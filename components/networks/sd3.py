"""SD3 / SD3.5 (``SD3Transformer2DModel``, MMDiT) behind the ``Denoiser`` protocol.

Call conventions (diffusers' ``StableDiffusion3Pipeline``): latents (B, 16, h, w) go in
unpatched; ``timestep`` is ``T σ`` (the scheduler's own timesteps); ``encoder_hidden_states`` is the
joint sequence (B, 77 + L_t5, 4096): CLIP-L and CLIP-G hidden states side by side (768 + 1280),
zero-padded to T5's width, followed by T5-XXL's sequence (zeros when the pipeline runs without
T5, as SD3 was trained with T5 dropped); ``pooled_projections`` (B, 2048) are the two CLIP
pooled embeddings. The output is the flow velocity ``u = ε − x0``. SD3 is not guidance-distilled:
CFG is two calls, as for a UNet.

A w-conditioned copy (Meng et al.) adds a zero-initialised projection of the w embedding to the
pooled text projection, which enters the transformer's time embedding: the copy computes
exactly what the teacher does until it trains (the role of a UNet's ``time_cond_proj_dim``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from components.networks import zero_w_projection
from components.schedules import FlowSchedule
from components.teacher import TextConditioning


class SD3Denoiser(torch.nn.Module):
    """An ``SD3Transformer2DModel`` as ``(x_t, t, cond) -> u``; runs in ``compute_dtype``,
    returns fp32."""

    prediction_type = "flow"
    embedded_guidance = False

    def __init__(self, transformer: torch.nn.Module, schedule: FlowSchedule,
                 compute_dtype: torch.dtype | None = None, w_dim: int = 0):
        super().__init__()
        self.transformer = transformer
        self.schedule = schedule
        self.compute_dtype = compute_dtype
        self.w_proj = None
        if w_dim:
            self.w_proj = zero_w_projection(transformer, w_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.compute_dtype or next(self.transformer.parameters()).dtype
        pooled = cond.pooled.to(dtype)
        if self.w_proj is not None and timestep_cond is not None:
            pooled = pooled + self.w_proj(timestep_cond.to(self.w_proj.weight.dtype)).to(dtype)
        timestep = self.schedule.model_timestep(t.to(x_t.device)).expand(x_t.shape[0])
        out = self.transformer(hidden_states=x_t.to(dtype), timestep=timestep,
                               encoder_hidden_states=cond.text.to(dtype),
                               pooled_projections=pooled, return_dict=False)[0]
        return out.float()

    def with_w_embedding(self, w_dim: int) -> SD3Denoiser:
        """A copy that also reads a guidance-weight embedding (B, w_dim) as ``timestep_cond``;
        its projection starts at zero (see the module docstring)."""
        return SD3Denoiser(copy.deepcopy(self.transformer), self.schedule, self.compute_dtype,
                           w_dim)


def sd3_denoiser(pipe: Any, compute_dtype: torch.dtype | None = None) -> SD3Denoiser:
    """The pipeline's transformer with its scheduler's own shifted flow schedule."""
    return SD3Denoiser(pipe.transformer, FlowSchedule.from_scheduler(pipe.scheduler),
                       compute_dtype)


def t5_length(pipe: Any) -> int:
    """T5 tokens per prompt: the pipeline's default 256, or its T5 tokenizer's own maximum
    when shorter (the tiny tier's)."""
    tok = getattr(pipe, "tokenizer_3", None)
    return min(256, tok.model_max_length) if tok is not None else 256


@torch.no_grad()
def encode_sd3(pipe: Any, prompts: Sequence[str]) -> TextConditioning:
    """(B, 77 + L_t5, 4096) joint sequence and (B, 2048) pooled embeddings of ``prompts``."""
    device = pipe.text_encoder.device
    text, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                            device=device, do_classifier_free_guidance=False,
                                            max_sequence_length=t5_length(pipe))
    return TextConditioning(text.float(), pooled.float())
