"""SANA (``SanaTransformer2DModel``, linear-attention DiT on DC-AE latents) behind the
``Denoiser`` protocol.

Call conventions (diffusers' ``SanaPipeline``): latents (B, 32, h, w) of the deep-compression
autoencoder (``AutoencoderDC``, 32× downsampling; decoded as ``z / scaling_factor``, no shift) go
in unpatched; ``timestep`` is ``T σ`` times the transformer's ``timestep_scale`` (the scheduler's
own timesteps: SANA's ``DPMSolverMultistepScheduler`` runs on flow sigmas, ``flow_shift``);
``encoder_hidden_states`` is Gemma-2's last hidden state (B, L, 2304) of the prompt, written
after SANA's default instruction (``complex_human_instruction``) and cut back to BOS plus its
last L − 1 tokens by the pipeline's own ``encode_prompt`` (L = 300), with
``encoder_attention_mask`` (B, L) over the padding: SANA's cross-attention ignores padded
tokens, so the mask travels with the embeddings (``TextConditioning.mask``). There is no pooled
embedding. The output is the flow velocity ``u = ε − x0`` (``flow_prediction``). SANA is not
guidance-distilled: CFG is two calls, as for a UNet (the empty prompt, encoded without the
instruction, is the unconditional input, as ``SanaPipeline`` encodes its negative prompt).

A w-conditioned copy (Meng et al.) adds a zero-initialised projection of the w embedding to the
timestep embedding (the output of ``time_embed.emb.timestep_embedder``), which feeds both the
adaptive norms of every block and the final layer: the copy computes exactly what the teacher
does until it trains, and since that embedding ends in a linear layer, a fixed w folds into its
bias (``fold_w``), leaving a stock transformer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from components.schedules import FlowSchedule
from components.teacher import TextConditioning


def _timestep_embedder(transformer: torch.nn.Module) -> torch.nn.Module:
    return transformer.time_embed.emb.timestep_embedder


class SanaDenoiser(torch.nn.Module):
    """A ``SanaTransformer2DModel`` as ``(x_t, t, cond) -> u``; runs in ``compute_dtype``,
    returns fp32."""

    prediction_type = "flow"
    embedded_guidance = False

    def __init__(self, transformer: torch.nn.Module, schedule: FlowSchedule,
                 compute_dtype: torch.dtype | None = None, w_dim: int = 0):
        super().__init__()
        if transformer.config.get("guidance_embeds", False):
            raise ValueError("this SANA transformer has a guidance embedding (SANA-Sprint, a "
                             "distilled model); Distillery distils SanaPipeline teachers")
        self.transformer = transformer
        self.schedule = schedule
        self.compute_dtype = compute_dtype
        self.w_proj = None
        self._w_shift: torch.Tensor | None = None
        if w_dim:
            param = next(transformer.parameters())
            width = _timestep_embedder(transformer).linear_2.out_features
            self.w_proj = torch.nn.Linear(w_dim, width, device=param.device, dtype=param.dtype)
            torch.nn.init.zeros_(self.w_proj.weight)
            torch.nn.init.zeros_(self.w_proj.bias)
            _timestep_embedder(transformer).register_forward_hook(self._add_w)

    def _add_w(self, module, args, out):
        return out if self._w_shift is None else out + self._w_shift.to(out.dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.compute_dtype or next(self.transformer.parameters()).dtype
        if cond.mask is None:
            raise ValueError("SANA conditioning has no attention mask: encode prompts with "
                             "components.networks.sana.encode_sana (or a cache written by it)")
        scale = float(self.transformer.config.get("timestep_scale", 1.0))
        timestep = (self.schedule.model_timestep(t.to(x_t.device)) * scale).expand(x_t.shape[0])
        if self.w_proj is not None and timestep_cond is not None:
            self._w_shift = self.w_proj(timestep_cond.to(self.w_proj.weight.dtype))
        try:
            out = self.transformer(hidden_states=x_t.to(dtype), timestep=timestep,
                                   encoder_hidden_states=cond.text.to(dtype),
                                   encoder_attention_mask=cond.mask.to(dtype),
                                   return_dict=False)[0]
        finally:
            self._w_shift = None
        return out.float()

    def with_w_embedding(self, w_dim: int) -> SanaDenoiser:
        """A copy that also reads a guidance-weight embedding (B, w_dim) as ``timestep_cond``;
        its projection starts at zero (see the module docstring)."""
        return SanaDenoiser(copy.deepcopy(self.transformer), self.schedule, self.compute_dtype,
                            w_dim)

    @torch.no_grad()
    def fold_w(self, w: float) -> torch.nn.Module:
        """A stock copy of the transformer that computes what this w-conditioned denoiser
        computes at ``w``: the projected w embedding is a constant added to the timestep
        embedder's output, i.e. to its last linear layer's bias."""
        from components.diffusion import guidance_embedding

        emb = _timestep_embedder(self.transformer)
        hooks, emb._forward_hooks = emb._forward_hooks, type(emb._forward_hooks)()
        try:  # the copy is a plain transformer, without the w input
            transformer = copy.deepcopy(self.transformer)
        finally:
            emb._forward_hooks = hooks
        param = self.w_proj.weight
        c = self.w_proj(guidance_embedding(torch.tensor([float(w)], device=param.device),
                                           self.w_proj.in_features).to(param.dtype))[0]
        linear = _timestep_embedder(transformer).linear_2
        linear.bias.add_(c.to(linear.bias))
        return transformer


def sana_denoiser(pipe: Any, compute_dtype: torch.dtype | None = None) -> SanaDenoiser:
    """The pipeline's transformer with its scheduler's own shifted flow schedule."""
    return SanaDenoiser(pipe.transformer, FlowSchedule.from_scheduler(pipe.scheduler),
                        compute_dtype)


def gemma_length(pipe: Any) -> int:
    """Gemma tokens per prompt: SanaPipeline's 300, or its tokenizer's own maximum when shorter
    (the tiny tier's)."""
    return min(300, pipe.tokenizer.model_max_length)


def default_instruction(pipeline_class: type) -> list[str]:
    """What a SANA pipeline class puts before each prompt by default (the
    ``complex_human_instruction`` default of its ``__call__``, read from the installed
    diffusers), so that the cache encodes prompts as the pipeline does."""
    import inspect

    default = inspect.signature(pipeline_class.__call__).parameters.get(
        "complex_human_instruction")
    return list(default.default or []) if default is not None else []


def instruction(pipe: Any) -> list[str]:
    """The default instruction of ``pipe``'s own class."""
    return default_instruction(type(pipe))


@torch.no_grad()
def encode_sana(pipe: Any, prompts: Sequence[str]) -> TextConditioning:
    """(B, L, D) Gemma sequence and its (B, L) attention mask, as ``SanaPipeline`` encodes a
    prompt (the empty prompt as its negative prompt: without the instruction)."""
    device = pipe.text_encoder.device
    prompts = list(prompts)
    chi = [] if all(p == "" for p in prompts) else instruction(pipe)
    text, mask, _, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                          device=device, clean_caption=False,
                                          max_sequence_length=gemma_length(pipe),
                                          complex_human_instruction=chi)
    return TextConditioning(text.float(), mask=mask.float())
