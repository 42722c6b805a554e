"""Image generation: per-image-seeded noise, prompt encoding, the teacher's DDIM sampler with CFG,
one- and few-step generators, and the ``Student`` a distillation run produces.

Image *i* is always generated from ``torch.Generator().manual_seed(seeds[i])`` on the CPU (its
starting noise, then the fresh noise of each re-noising step of a few-step generator), so the
same seeds give the same images whatever the batch size or device.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from components.diffusion import (
    Denoiser,
    guided_eps_x0,
    predict_eps_x0,
    predict_velocity,
    predict_x0,
    w_conditioning,
)
from components.few_step import (
    NoiseFn,
    divisor_steps,
    multistep_x0,
    step_grid,
    trailing_timesteps,
)
from components.networks import network_device
from components.teacher import TextConditioning, absent_parts, teacher_denoiser

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def precision_dtype(name: str) -> torch.dtype:
    """The dtype networks of a stage run in, from its ``precision`` setting."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; valid precisions are: "
                         f"{', '.join(PRECISIONS)}")
    return PRECISIONS[name]


@dataclass(frozen=True)
class GeneratorSpec:
    """How a student maps noise z to a clean latent; stored in ``student.json``.

    ``x0_from_eps`` (SwiftBrush, DMD2, SiD): one step, ``x_in = input_scale * z`` and
    ``x̂0 = (x_in − σ_t ε(x_in, t)) / α_t`` at fixed ``t``; ``input_scale`` is ``"unit"`` (pure
    noise at t = 999) or ``"sigma"`` (SiD: ``x_in = σ_t z`` at t = 625). With ``steps`` N > 1,
    DMD2's N-step generator from pure noise (``components.few_step``: x̂0 at each step of
    [999, 749, 499, 249] for N = 4, re-noised to the next with fresh noise; ``t`` = 999, unit).
    ``rectified_flow`` (InstaFlow): ``steps`` Euler steps of the velocity network from noise
    (τ = 0) to image (τ = 1), the network called at ``t_unet = 1000 (1 − τ)``.
    ``ddim`` (Meng et al.): ``steps`` deterministic DDIM steps on the trailing grid, the network
    conditioned on the guidance weight ``guidance_weight`` through a ``w_dim``-sized embedding.
    """

    kind: Literal["x0_from_eps", "rectified_flow", "ddim"] = "x0_from_eps"
    t: int = 999
    input_scale: Literal["unit", "sigma"] = "unit"
    steps: int = 1
    guidance_weight: float = 0.0
    w_dim: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"a generator takes at least one step, got steps={self.steps}")
        if self.kind == "x0_from_eps" and self.steps > 1 and self.input_scale != "unit":
            raise ValueError("a few-step x0_from_eps generator starts from pure noise: "
                             "input_scale must be 'unit'")


def score_generator(steps: int, t: int, input_scale: Literal["unit", "sigma"],
                    num_timesteps: int) -> GeneratorSpec:
    """A score method's generator: one step at ``t`` on ``input_scale`` noise, or DMD2's
    ``steps``-step generator on ``step_grid`` (which says why a step count is not allowed)."""
    if steps == 1:
        return GeneratorSpec(t=t, input_scale=input_scale)
    return GeneratorSpec(t=step_grid(num_timesteps, steps)[0], input_scale="unit", steps=steps)


def sampling_steps(spec: GeneratorSpec) -> list[int]:
    """The step counts a student of ``spec`` samples with: the divisors of a few-step
    ``x0_from_eps`` student's N (grids on its own), every other kind its own ``steps`` only."""
    return divisor_steps(spec.steps) if spec.kind == "x0_from_eps" else [spec.steps]


def with_steps(spec: GeneratorSpec, steps: int | None) -> GeneratorSpec:
    """``spec`` sampled with ``steps`` (None: as trained); one clear error when not allowed."""
    if steps is None or steps == spec.steps:
        return spec
    allowed = sampling_steps(spec)
    if steps not in allowed:
        raise ValueError(f"this {spec.kind} student was trained for {spec.steps} step(s) and "
                         f"samples with steps in {allowed} (grids on the one it trained on), "
                         f"not {steps}")
    return replace(spec, steps=steps)


class SeededNoise:
    """Per-image noise streams: row i from its own CPU generator seeded with ``seeds[i]``; the
    first draw is the starting noise, later ones a few-step generator's fresh noise (the order
    diffusers' pipelines draw in, given one generator per image)."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        """The next draw (N, *shape), in float32 on the CPU."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """The next draw shaped like x (N, ...), on its device in its dtype (a ``NoiseFn``)."""
        return self(x.shape[1:]).to(x)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Noise (N, *shape), row i drawn from its own CPU generator seeded with ``seeds[i]``."""
    return SeededNoise(seeds)(shape)


def one_step_x0(denoiser: Denoiser, z: torch.Tensor, cond: Any, spec: GeneratorSpec) -> torch.Tensor:
    """The one-step generator G(z, y) of ``spec`` (differentiable through ``denoiser``)."""
    t = torch.full((z.shape[0],), spec.t, dtype=torch.long, device=z.device)
    _, sigma = denoiser.schedule.alpha_sigma(t, z)
    x_in = z if spec.input_scale == "unit" else sigma * z
    return predict_x0(denoiser, x_in, t, cond)


def rectified_flow_sample(velocity: Denoiser, z: torch.Tensor, cond: Any,
                          steps: int) -> torch.Tensor:
    """Euler steps ``x ← x + v(x, τ) / N`` from τ = 0 (noise) to τ = 1 (differentiable); v is
    ``predict_velocity`` (a flow network's own velocity, else the network read as one)."""
    x = z
    for i in range(steps):
        x = x + predict_velocity(velocity, x, i / steps, cond) / steps
    return x


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t_next: int,
              schedule: Any) -> torch.Tensor:
    """Deterministic DDIM step to ``t_next`` (−1 means the clean end point: returns x0)."""
    if t_next < 0:
        return x0
    t = torch.full((x_t.shape[0],), t_next, dtype=torch.long, device=x_t.device)
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    return alpha * x0 + sigma * eps


def ddim_student_sample(denoiser: Denoiser, z: torch.Tensor, cond: Any, steps: int,
                        timestep_cond: torch.Tensor | None = None,
                        guidance: torch.Tensor | None = None) -> torch.Tensor:
    """A (w-conditioned) student's own N-step DDIM from pure noise, no CFG (differentiable);
    w enters as ``timestep_cond`` or, on a guidance-embedded network, as ``guidance``
    (``components.diffusion.w_conditioning``). On a flow schedule the DDIM step is the Euler
    step of the velocity."""
    schedule = denoiser.schedule
    grid = trailing_timesteps(schedule.num_timesteps, steps)
    x = z
    for i, t_now in enumerate(grid):
        t = torch.full((z.shape[0],), t_now, dtype=torch.long, device=z.device)
        eps, x0 = predict_eps_x0(denoiser, x, t, cond, timestep_cond, guidance)
        x = ddim_step(x, x0, eps, grid[i + 1] if i + 1 < len(grid) else -1, schedule)
    return x


def generate_latents(denoiser: Denoiser, z: torch.Tensor, cond: Any, spec: GeneratorSpec,
                     noise: NoiseFn | None = None) -> torch.Tensor:
    """The student's sample for noise z (B, C, h, w) under ``spec`` (differentiable); a
    few-step ``x0_from_eps`` generator draws its fresh noise from ``noise`` (e.g.
    ``SeededNoise(seeds).like``, whose first draw was z)."""
    if spec.kind == "x0_from_eps" and spec.steps > 1:
        if noise is None:
            raise ValueError("a few-step generator re-noises between its steps: pass noise= "
                             "(e.g. SeededNoise(seeds).like)")
        grid = step_grid(denoiser.schedule.num_timesteps, spec.steps)
        return multistep_x0(denoiser, z, cond, grid, noise)
    if spec.kind == "x0_from_eps":
        return one_step_x0(denoiser, z, cond, spec)
    if spec.kind == "rectified_flow":
        return rectified_flow_sample(denoiser, z, cond, spec.steps)
    if spec.kind == "ddim":
        w_inputs = None
        if spec.w_dim:
            w = torch.full((z.shape[0],), spec.guidance_weight, device=z.device)
            w_inputs = w_conditioning(denoiser, w, spec.w_dim)
        return ddim_student_sample(denoiser, z, cond, spec.steps, **(w_inputs or {}))
    raise ValueError(f"unknown generator kind {spec.kind!r}; expected x0_from_eps, "
                     "rectified_flow or ddim")


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, z: torch.Tensor, cond: Any, uncond: Any, steps: int,
                guidance_scale: float) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from pure noise with CFG scale s; ``steps`` evenly spaced.

    With ``steps = 1`` this is the teacher's own one-step x0 prediction at t = T − 1: the
    untrained student that distillation starts from.
    """
    T = denoiser.schedule.num_timesteps
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    x = z
    for i, t_now in enumerate(ts):
        t = torch.full((z.shape[0],), t_now, dtype=torch.long, device=z.device)
        eps, x0 = guided_eps_x0(denoiser, x, t, cond, uncond, guidance_scale)
        if i + 1 == len(ts):
            return x0
        t_next = torch.full_like(t, ts[i + 1])
        alpha_n, sigma_n = denoiser.schedule.alpha_sigma(t_next, x)
        x = alpha_n * x0 + sigma_n * eps
    return x


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str]) -> TextConditioning:
    """Text conditioning from the pipeline's own tokenizer(s) and text encoder(s).

    SD1.x/2.x: the last hidden states (B, 77, D). SDXL (two encoders): the pipeline's own
    ``encode_prompt`` (B, 77, 2048), the pooled embedding (B, 1280) and the size/crop time ids
    (B, 6) of its default resolution. Flow transformers (SD3, FLUX): their family's encoding
    (``components.networks``).
    """
    from components.networks import encode, is_flow

    if is_flow(pipe):
        return encode(pipe, prompts)
    if getattr(pipe, "text_encoder_2", None) is not None:
        text, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts),
                                                device=pipe.text_encoder_2.device,
                                                do_classifier_free_guidance=False)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32,
                                device=text.device)  # with the embeddings: the UNet mixes them
        return TextConditioning(text.float(), pooled.float(), time_ids.expand(len(prompts), 6))
    tokens = pipe.tokenizer(list(prompts), padding="max_length", truncation=True,
                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    hidden = pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]
    return TextConditioning(hidden.float())


@torch.no_grad()
def unconditional(pipe: Any) -> TextConditioning:
    """The unconditional embedding (1 row): the encoded empty prompt, or zeros where the
    pipeline says so (SDXL's ``force_zeros_for_empty_prompt``, as DMD2 uses)."""
    null = encode_prompts(pipe, [""])
    if pipe.config.get("force_zeros_for_empty_prompt", False):
        zero = lambda a: None if a is None else torch.zeros_like(a)
        return TextConditioning(zero(null.text), zero(null.pooled), null.time_ids)
    return null


DECODE_CHUNK = 8  # latents per VAE call: a 512-px fp32 decode holds ~0.75 GiB per image
# latent side above which the VAE decodes in tiles, when asked (e.g. 64: SDXL's 128 in 64-wide
# tiles); off by default: tiles blend at their seams, so the pixels differ from the untiled
# decode of the stock diffusers pipelines (up to 11/255 on a tiny FLUX VAE at 128x128 latents)
TILE_SIZE = None


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor, chunk_size: int = DECODE_CHUNK,
                   tile_size: int | None = TILE_SIZE) -> np.ndarray:
    """Latents (B, C, h, w) → uint8 images (B, H, W, 3) through the pipeline's VAE.

    At most ``chunk_size`` latents go through the VAE at a time, so its activation memory is
    bounded by the chunk, not the batch, and each chunk's images leave the device at once.
    Latents wider than ``tile_size`` use diffusers' tiled decode: overlapping tiles of
    ``tile_size`` latents with blended seams, less memory but other pixels than the stock
    pipelines' untiled decode (None, the default: never tiled).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vae = pipe.vae
    tiled = tile_size is not None and max(latents.shape[-2:]) > tile_size
    saved = _set_tiling(vae, tile_size) if tiled else None
    try:
        return np.concatenate([_decode_chunk(vae, part) for part in latents.split(chunk_size)])
    finally:
        if saved is not None:
            vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size = saved


def _set_tiling(vae: Any, tile_size: int) -> tuple:
    """Turn on the VAE's tiled decode with tiles of ``tile_size`` latents; return what it was."""
    saved = (vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling, vae.tile_latent_min_size = True, tile_size
    vae.tile_sample_min_size = tile_size * factor
    return saved


def latents_from_vae(raw: torch.Tensor, vae: Any) -> torch.Tensor:
    """The model's latents of the VAE's raw latents: ``(z − shift) · scale`` (SD3 and FLUX VAEs
    have a ``shift_factor``; SD's have none, so ``z · scale``)."""
    shift = vae.config.get("shift_factor") or 0.0
    return (raw - shift) * vae.config.scaling_factor


def latents_to_vae(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """Inverse of ``latents_from_vae``: what the VAE decodes, ``x / scale + shift``, in the
    VAE's dtype."""
    shift = vae.config.get("shift_factor") or 0.0
    return (latents / vae.config.scaling_factor + shift).to(vae.dtype)


def _decode_chunk(vae: Any, latents: torch.Tensor) -> np.ndarray:
    x = vae.decode(latents_to_vae(latents, vae), return_dict=False)[0]
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def latent_shape(pipe: Any) -> tuple[int, int, int]:
    """(C, h, w) of the pipeline's latents at its native resolution."""
    from components.networks import is_flow

    if is_flow(pipe):
        from components.networks import latent_shape as flow_latent_shape

        return flow_latent_shape(pipe)
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (pipe.unet.config.in_channels, h, w)


def _batched(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


@torch.no_grad()
def sample_teacher(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                   guidance_scale: float, batch_size: int = 16) -> np.ndarray:
    """Teacher images (N, H, W, 3) uint8 by DDIM with CFG; image i seeded with ``seeds[i]``."""
    denoiser = teacher_denoiser(pipe)
    null = unconditional(pipe)
    out = []
    for start, chunk in _batched(list(prompts), batch_size):
        z = seeded_noise(seeds[start:start + len(chunk)], latent_shape(pipe))
        z = z.to(network_device(pipe))
        cond = encode_prompts(pipe, chunk)
        latents = ddim_sample(denoiser, z, cond, null.expand(len(chunk)), steps, guidance_scale)
        out.append(decode_latents(pipe, latents))
    return np.concatenate(out)


class Student:
    """A distilled one- or few-step generator: the teacher pipeline with the student network
    (a UNet or a flow transformer)."""

    def __init__(self, pipe: Any, spec: GeneratorSpec):
        self.pipe = pipe
        self.spec = spec
        self.denoiser = teacher_denoiser(pipe)  # the student network, read like the teacher's

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 16,
                 steps: int | None = None) -> np.ndarray:
        """Images (N, H, W, 3) uint8 (``steps`` network evaluations each: the student's own by
        default, or one of ``sampling_steps(spec)``); image i from ``seeds[i]``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        spec = with_steps(self.spec, steps)
        out = []
        for start, chunk in _batched(list(prompts), batch_size):
            noise = SeededNoise(seeds[start:start + len(chunk)])
            z = noise(latent_shape(self.pipe)).to(network_device(self.pipe))
            cond = encode_prompts(self.pipe, chunk)
            latents = generate_latents(self.denoiser, z, cond, spec, noise.like)
            out.append(decode_latents(self.pipe, latents))
        return np.concatenate(out)


STUDENT_FILE = "student.json"


def save_student(pipe: Any, spec: GeneratorSpec, folder: str | Path, extra: dict) -> None:
    """Write the student as a diffusers pipeline folder plus ``student.json`` (its generator).

    The folder's scheduler is the stock one with which diffusers' own pipeline reproduces
    ``Student.generate`` (``components.stock_scheduler``; a flow teacher's own flow scheduler,
    ``components.flow_stock``; ``student.json: diffusers`` says how to call it, or why no stock
    call can), and no config holds a machine path: the same weights give the same files in
    every clone.
    """
    from components.flow_stock import flow_stock_call
    from components.networks import is_flow
    from components.stock_scheduler import stock_call

    folder = Path(folder)
    call = flow_stock_call(pipe, spec) if is_flow(pipe) else stock_call(pipe.scheduler, spec)
    if call.scheduler is not None:
        pipe = copy.copy(pipe)  # the caller's pipeline keeps its scheduler
        pipe.scheduler = call.scheduler  # diffusers records the new class in model_index.json
    pipe.save_pretrained(folder, safe_serialization=True)
    _drop_machine_paths(folder)
    meta = {"generator": asdict(spec), "sampling_steps": sampling_steps(spec),
            "diffusers": call.describe(), **extra}
    (folder / STUDENT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _drop_machine_paths(folder: Path) -> None:
    """Remove diffusers' ``_name_or_path`` (the folder the pipeline was loaded from) from every
    saved config; loading sets it again from wherever the folder then is."""
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_student(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 base: str | Path | None = None) -> Student:
    """Load a student folder written by ``save_student`` (in ``dtype``, on ``device``).

    A LoRA student (``student.json: student.kind: lora``) loads as its full-weight folder (the
    LoRA fused), or, given ``base`` (its teacher's pipeline folder), as the teacher with the
    unfused LoRA: the network exactly as it trained (``components.student``)."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    meta_path = folder / STUDENT_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} is not a Distillery student (no {STUDENT_FILE}); "
                                "produce one with the distill stage (`dvc repro distill`).")
    meta = json.loads(meta_path.read_text())
    if base is not None:
        from components.student import lora_pipeline

        pipe = lora_pipeline(base, folder, dtype).to(device)
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype,
                                                 **absent_parts(folder)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return Student(pipe, GeneratorSpec(**meta["generator"]))
