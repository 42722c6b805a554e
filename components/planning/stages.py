"""Plans of the inference stages: ``cache_teacher`` (text embeddings and teacher pairs) and
``evaluate`` (teacher and student generation, decoding), from traced forward passes.

Each network call a stage makes is traced once on ``meta`` tensors of the teacher's real
architecture, as the distill plan traces an iteration (``components.planning.trace``): under
``torch.no_grad``, with the GPU's fused attention and, in bf16, CUDA autocast's casting rules
(``components.planning.kernels``), FLOPs from ``FlopCounterMode`` and the peak of live tensors
from ``MemTracker``. A guided teacher step is one call of the batched [uncond; cond] pair (one
call with a guidance input for FLUX.1-dev), as the stages run it; a student step is one call.

Time is FLOPs / (the GPU's peak in the stage's precision × the efficiency), as in the distill
plan; memory on the GPU is the networks the stage holds at once plus the largest traced call's
activations at the stage's batch, the caching allocator's share and the CUDA context. The text
encoders are costed by ``components.planning.text`` (2 FLOPs per matrix weight per token). Not
traced: Inception (FID) and the CLIP scorer of ``evaluate``, whose architectures come with their
weights; a plan says so in its notes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from components.planning.estimate import ALLOCATOR, CUDA_CONTEXT_GIB, GIB, usable_bytes
from components.planning.kernels import ATTENTION_FLOPS, GpuKernels
from components.planning.teachers import SpecBatches, TeacherSpec, spec_teacher
from components.planning.text import TextRequest


@dataclass(frozen=True)
class Call:
    """One traced network call: FLOPs per image, the network's weights and the peak bytes of
    the tensors it makes (activations and temporaries) at ``batch`` images."""

    name: str
    flops_per_image: float
    weight_bytes: int
    activation_bytes: int
    batch: int


def _weights(module: torch.nn.Module, dtype_bytes: int) -> int:
    return sum(p.numel() for p in module.parameters()) * dtype_bytes


def traced_call(name: str, module: torch.nn.Module, call, batch: int, bf16: bool) -> Call:
    """Trace ``call()`` (one forward of ``module`` at ``batch`` images) on ``meta``."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from torch.utils.flop_counter import FlopCounterMode

    from components.planning.trace import SHAPES

    kernels = GpuKernels(torch.bfloat16 if bf16 else None)
    tracker = MemTracker()
    tracker.track_external(module)
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
    with torch.no_grad(), SHAPES, tracker, counter, kernels, (
            kernels.region() if bf16 else contextlib.nullcontext()):
        call()
    made_kinds = (_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH)  # not weights
    peak = tracker.get_tracker_snapshot("peak")
    made = max(sum(kinds.get(k, 0) for k in made_kinds) for kinds in peak.values())
    return Call(name, counter.get_total_flops() / batch, _weights(module, 2 if bf16 else 4),
                int(made), batch)


def _network_and_batch(spec: TeacherSpec, batch: int):
    b = SpecBatches(spec)(batch, torch.Generator())
    return spec_teacher(spec).network, b, torch.full((batch,), 999, device="meta")


def guided_call(spec: TeacherSpec, batch: int, bf16: bool) -> Call:
    """The guided teacher step at ``batch`` images: [uncond; cond] in one call, or FLUX's
    guidance input."""
    from components.diffusion import guided

    net, b, t = _network_and_batch(spec, batch)
    return traced_call("teacher step (CFG)", net,
                       lambda: guided(net, b.z, t, b.cond, b.uncond, 4.0), batch, bf16)


def student_call(spec: TeacherSpec, batch: int, bf16: bool) -> Call:
    """The student step (one call, the teacher's architecture) at ``batch`` images."""
    from components.diffusion import predict_x0

    net, b, t = _network_and_batch(spec, batch)
    return traced_call("student step", net, lambda: predict_x0(net, b.z, t, b.cond), batch,
                       bf16)


def decode_call(vae_config: dict[str, Any], latent: tuple[int, int, int], batch: int) -> Call:
    """One VAE decode of ``batch`` latents (the stages decode in fp32): an ``AutoencoderKL``,
    or SANA's deep-compression ``AutoencoderDC`` (its config names per-stage block types)."""
    from diffusers import AutoencoderDC, AutoencoderKL

    cls = AutoencoderDC if "decoder_block_types" in vae_config else AutoencoderKL
    with torch.device("meta"):
        vae = cls.from_config(vae_config)
    z = torch.zeros(batch, *latent, device="meta")
    return traced_call("VAE decode", vae, lambda: vae.decode(z, return_dict=False), batch,
                       False)


@dataclass(frozen=True)
class Work:
    """A stage's work: (call, calls per item, items) for each traced call, the text encodings,
    and the networks held on the GPU at once."""

    calls: tuple[tuple[Call, int, int], ...]
    text: TextRequest | None
    prompts_encoded: int
    resident: tuple[Call, ...]


def stage_plan(stage: str, work: Work, flops_per_second: float, gpu_memory_gib: float,
               notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The plan of ``stage`` on one GPU: memory (the resident networks, the text encoders, the
    largest call's activations with the allocator's share, the CUDA context), TFLOP and time
    by part, and whether it fits."""
    parts = {c.name: c.flops_per_image * per * items for c, per, items in work.calls}
    if work.text is not None and work.prompts_encoded:
        parts["text encoding"] = work.text.flops_per_prompt * work.prompts_encoded
    weights = sum(c.weight_bytes for c in work.resident)
    encoders = work.text.encoder_bytes if work.text is not None else 0
    activations = max((c.activation_bytes for c, _, _ in work.calls), default=0)
    memory = {"networks": weights, "text_encoders": encoders, "activations": activations,
              "allocator": ALLOCATOR * activations, "cuda_context": CUDA_CONTEXT_GIB * GIB}
    memory["total"] = sum(memory.values())
    usable = usable_bytes(gpu_memory_gib)
    seconds = {k: v / flops_per_second for k, v in parts.items()}
    return {
        "stage": stage,
        "calls": [{"name": c.name, "tflop_per_image": _sig(c.flops_per_image / 1e12),
                   "calls_per_item": per, "items": items, "batch": c.batch,
                   "activation_gib": round(c.activation_bytes / GIB, 3)}
                  for c, per, items in work.calls],
        "memory_gib": {k: round(v / GIB, 3) for k, v in memory.items()},
        "usable_gib": round(usable / GIB, 2), "fits": memory["total"] <= usable,
        "tflop": {k: _sig(v / 1e12) for k, v in parts.items()},
        "seconds": {k: _sig(v) for k, v in seconds.items()},
        "gpu_hours": _sig(sum(seconds.values()) / 3600), "notes": list(notes)}


def _sig(value: float) -> float:
    return float(f"{value:.4g}")
