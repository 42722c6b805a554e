"""The traced teacher: its architecture from configs alone, the network built on ``meta``, and
batches of its shapes.

Families (``components.networks``): ``unet`` (diffusers ``UNet2DConditionModel``: SD1.5,
SD2.1, SDXL), ``sd3`` (``SD3Transformer2DModel``: SD3.5 Medium and Large), ``flux``
(``FluxTransformer2DModel``: FLUX.1) and ``sana`` (``SanaTransformer2DModel``: SANA 1.6B and
0.6B). Each is wrapped in the adapter the distill stage uses, so the trace runs the call
conventions of a real run: SD3's joint CLIP + T5 sequence (77 + 256 tokens) and pooled CLIP
embeddings, FLUX's packed latents with T5's 512 tokens and its guidance input, SANA's 300 Gemma
tokens with their attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from components.diffusion import NoiseSchedule
from components.methods import Batch, Teacher
from components.teacher import TextConditioning, UNetDenoiser

FAMILIES = ("unet", "sd3", "flux", "sana")
TEXT_LENGTHS = {"unet": 77, "sd3": 77 + 256, "flux": 512, "sana": 300}  # the pipelines' defaults


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher's architecture: its network's config (a ``UNet2DConditionModel``'s, or for
    the flow families the transformer's), its scheduler's config, the text sequence length of
    its prompts and its family (``FAMILIES``)."""

    network: dict[str, Any]
    scheduler: dict[str, Any]
    text_length: int = 77
    family: str = "unet"

    @property
    def latent(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents at the native resolution."""
        if self.family == "flux":  # 16 channels, packed 2x2 into the transformer's 64
            return (self.network["in_channels"] // 4, 128, 128)
        side = self.network.get("sample_size", 64)
        side = side if isinstance(side, int) else side[0]
        return (self.network.get("in_channels", 4), side, side)

    @property
    def traits(self) -> dict[str, Any]:
        """What the methods' teacher checks read (``components.networks.folder_traits``)."""
        return {"family": self.family,
                "embedded_guidance": self.family == "flux" and bool(
                    self.network.get("guidance_embeds", False))}


def flow_spec(arch: str) -> TeacherSpec:
    """The spec of a flow architecture of ``components.flow_architectures``."""
    from components.flow_architectures import SANA_ARCHS, scheduler_config, transformer_config

    family = "flux" if arch == "flux1" else "sana" if arch in SANA_ARCHS else "sd3"
    return TeacherSpec(transformer_config(arch), scheduler_config(arch), TEXT_LENGTHS[family],
                       family)


def spec_teacher(spec: TeacherSpec, device: str = "meta") -> Teacher:
    """The teacher network built from its configs with random weights (none on ``meta``)."""
    if spec.family != "unet":
        return Teacher(_flow_network(spec, device))
    from diffusers import DDIMScheduler, UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(spec.network)
    schedule = NoiseSchedule.from_scheduler(DDIMScheduler.from_config(spec.scheduler))
    kind = spec.scheduler.get("prediction_type", "epsilon")
    return Teacher(UNetDenoiser(unet, schedule, kind))


def _flow_network(spec: TeacherSpec, device: str) -> torch.nn.Module:
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SanaTransformer2DModel,
        SD3Transformer2DModel,
    )

    from components.networks.flux import FluxDenoiser
    from components.networks.sana import SanaDenoiser
    from components.networks.sd3 import SD3Denoiser
    from components.schedules import FlowSchedule

    if spec.family == "sana":
        with torch.device(device):
            transformer = SanaTransformer2DModel.from_config(spec.network)
        return SanaDenoiser(transformer, FlowSchedule.from_scheduler(
            DPMSolverMultistepScheduler.from_config(spec.scheduler)))
    flux = spec.family == "flux"
    with torch.device(device):
        cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
        transformer = cls.from_config(spec.network)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(spec.scheduler)
    if not flux:
        return SD3Denoiser(transformer, FlowSchedule.from_scheduler(scheduler))
    _, h, w = spec.latent
    return FluxDenoiser(transformer, FlowSchedule.from_scheduler(
        scheduler, image_seq_len=(h // 2) * (w // 2)))


def prompt_values(spec: TeacherSpec) -> int:
    """How many numbers one prompt's conditioning holds (what a cache stores per prompt)."""
    cond = SpecBatches(spec)._cond(1)
    return sum(a.numel() for a in cond.tensors().values())


class SpecBatches:
    """Batches of zeros of the teacher's shapes (with teacher pairs), on ``device``."""

    def __init__(self, spec: TeacherSpec, device: str = "meta"):
        self.spec, self.device = spec, device

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.device)

    def _cond(self, b: int) -> TextConditioning:
        n, length = self.spec.network, self.spec.text_length
        if self.spec.family == "sana":  # (B, L, 2304) Gemma sequence and its mask
            return TextConditioning(self._zeros(b, length, n["caption_channels"]),
                                    mask=torch.ones(b, length, device=self.device))
        if self.spec.family != "unet":  # (B, L, 4096) text, (B, pooled) CLIP embeddings
            return TextConditioning(self._zeros(b, length, n["joint_attention_dim"]),
                                    self._zeros(b, n["pooled_projection_dim"]))
        dim = n["cross_attention_dim"]
        dim = dim if isinstance(dim, int) else dim[0]
        text = self._zeros(b, length, dim)
        if n.get("addition_embed_type") != "text_time":
            return TextConditioning(text)
        ids = 6
        pooled = n["projection_class_embeddings_input_dim"] - ids * n["addition_time_embed_dim"]
        return TextConditioning(text, self._zeros(b, pooled), self._zeros(b, ids))

    def __call__(self, batch_size: int, gen: torch.Generator, step: int = 0) -> Batch:
        shape = (batch_size, *self.spec.latent)
        return Batch(self._cond(batch_size), self._cond(batch_size), self._zeros(*shape), gen,
                     step, self._zeros(*shape))
