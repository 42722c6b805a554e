"""The stock diffusers call that reproduces a student of a flow teacher (SD3 / SD3.5, FLUX.1,
SANA): the folder keeps the teacher's ``FlowMatchEulerDiscreteScheduler`` and
``StableDiffusion3Pipeline.from_pretrained(student)(prompt, num_inference_steps=N,
sigmas=[...], guidance_scale=1)`` computes what ``Student.generate`` computes (a folder saved
without its T5 encoder loads with ``text_encoder_3=None, tokenizer_3=None``, which
``student.json: diffusers.from_pretrained`` lists). ``FluxPipeline`` takes the same call plus the
student's ``height`` and ``width`` (its resolution fixes the scheduler's shift: the pipeline
computes μ from the image's token count and shifts the given sigmas by ``exp(μ)``, so the sigmas
are unshifted with that factor) and ``max_sequence_length``; its ``guidance_scale`` is FLUX.1-dev's
guidance input, 1 for a student that runs without one, and with ``true_cfg_scale`` at its default
1 it runs no CFG. ``SanaPipeline``'s DPM-Solver on flow sigmas takes no ``sigmas``, so a SANA
student is saved with the ``FlowMatchEulerDiscreteScheduler`` of the same shift (its Euler step
is the one below; the pipeline feeds the transformer ``T σ`` as the solver does) and called with
its ``height``, ``width``, ``max_sequence_length`` and ``use_resolution_binning=False`` (the
student generates at its own resolution); the default instruction before each prompt is the one
the student was trained with.

The stock sampler is Euler on the velocity, ``x ← x + (σ' − σ) u(x, T σ)`` from unscaled noise
over the scheduler's *shifted* ``sigmas`` (it shifts the ones it is given), ending at σ = 0; a
scale ``guidance_scale`` ≤ 1 runs no CFG. Per generator kind (``GeneratorSpec``):

- ``x0_from_eps`` on unit noise at t (SwiftBrush, DMD2): x̂0 = z − σ(t) u(z, t) is one Euler
  step from σ(t) to 0: ``sigmas = [(t + 1) / T]`` (unshifted).
- ``rectified_flow`` (InstaFlow): ``x ← x + v / N`` with v = −u at σ = 1 − i/N is Euler over
  σ_i = 1 − i/N: the unshifted sigmas of those.
- ``ddim`` (Meng et al.): on a flow the DDIM step is the Euler step, on the trailing grid
  σ(t_i), t_i = T (N − i)/N − 1: unshifted ``sigmas = [(N − i)/N]``. A w-conditioned student is
  saved with its w input folded in at its guidance weight (``components.networks.sd3``).
- ``x0_from_eps`` on ``σ_t z`` (SiD): the stock pipeline starts from unscaled noise, so no call
  reproduces it; ``student.json`` says so.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from components.generation import GeneratorSpec, trailing_timesteps
from components.schedules import FlowSchedule, unshift_sigma
from components.stock_scheduler import StockCall

STOCK_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline", "SanaPipeline")


def _reason(spec: GeneratorSpec, pipe: Any) -> str | None:
    name = type(pipe).__name__
    if name not in STOCK_PIPELINES:
        return (f"the stock {name} call is not checked against this student; generate with "
                "components.generation.load_student")
    if spec.kind == "x0_from_eps" and spec.steps > 1:
        return ("the few-step generator re-noises x0 between its steps, which no stock call is "
                "checked against here; generate with components.generation.load_student")
    if spec.kind == "x0_from_eps" and spec.input_scale == "sigma":
        return (f"the student's input is sigma_t z (SiD) and {name} starts from unscaled "
                "noise; generate with components.generation.load_student")
    if spec.kind == "ddim" and spec.w_dim:
        return (f"the student reads a guidance-weight embedding that {name} cannot feed; save it "
                "with the embedding folded in (components.networks.saved_network)")
    return None


def student_sigmas(spec: GeneratorSpec, schedule: FlowSchedule) -> list[float]:
    """The shifted σ of each of the student's network calls, noise end first."""
    T = schedule.num_timesteps
    if spec.kind == "x0_from_eps":
        t = torch.tensor([float(spec.t)])
    elif spec.kind == "rectified_flow":
        return [1.0 - i / spec.steps for i in range(spec.steps)]
    elif spec.kind == "ddim":
        t = torch.tensor(trailing_timesteps(T, spec.steps), dtype=torch.float64)
    else:
        raise ValueError(f"unknown generator kind {spec.kind!r}")
    return schedule.sigma(t).tolist()


def flow_stock_call(pipe: Any, spec: GeneratorSpec) -> StockCall:
    """How the pipeline's own class (``StableDiffusion3Pipeline``, ``FluxPipeline``) reproduces
    ``spec`` on ``pipe``'s own scheduler, or a ``StockCall`` with ``reason`` where it cannot
    (checked: the stock scheduler's shifted sigmas must be the student's)."""
    from components.networks import family, latent_shape

    scheduler = pipe.scheduler
    if (why := _reason(spec, pipe)) is not None:
        return StockCall(None, spec.steps, 1.0, reason=why)
    saved = None  # the scheduler to save in place of the teacher's (None: keep it)
    if family(pipe) == "sana":  # SANA's DPM-Solver takes no sigmas: its Euler twin does
        from diffusers import FlowMatchEulerDiscreteScheduler

        schedule = FlowSchedule.from_scheduler(scheduler)
        saved = scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=schedule.num_timesteps, shift=schedule.shift)
    name = type(scheduler).__name__
    extra: dict[str, Any] = {}
    shift_args: dict[str, Any] = {}
    if family(pipe) == "flux":  # the resolution the student generates at sets the shift
        _, h, w = latent_shape(pipe)
        schedule = FlowSchedule.from_scheduler(scheduler, image_seq_len=(h // 2) * (w // 2))
        extra.update(height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor)
        if scheduler.config.get("use_dynamic_shifting"):
            shift_args["mu"] = math.log(schedule.shift)
    else:
        schedule = FlowSchedule.from_scheduler(scheduler)
    want = student_sigmas(spec, schedule)
    given = [float(unshift_sigma(torch.tensor(s, dtype=torch.float64), schedule.shift))
             for s in want]
    stock = type(scheduler).from_config(scheduler.config)
    stock.set_timesteps(sigmas=given, **shift_args)
    got = stock.sigmas[:-1].tolist()
    if any(abs(a - b) > 1e-5 for a, b in zip(got, want, strict=True)):
        return StockCall(None, len(want), 1.0, reason=(
            f"{name} steps at sigmas {got}, not at the student's {want}"))
    extra["sigmas"] = [round(s, 8) for s in given]
    if family(pipe) == "flux":  # the T5 length the student was fed
        from components.networks.flux import t5_length

        extra["max_sequence_length"] = t5_length(pipe)
    elif family(pipe) == "sana":  # the Gemma length the student was fed, at its resolution
        from components.networks.sana import gemma_length

        _, h, w = latent_shape(pipe)
        extra.update(max_sequence_length=gemma_length(pipe), height=h * pipe.vae_scale_factor,
                     width=w * pipe.vae_scale_factor, use_resolution_binning=False)
    elif getattr(pipe, "tokenizer_3", None) is not None:
        from components.networks.sd3 import t5_length

        extra["max_sequence_length"] = t5_length(pipe)
    optional = set(type(pipe)._optional_components)
    absent = {k: None for k, v in pipe.components.items() if v is None and k not in optional}
    return StockCall(saved, len(want), 1.0, pipeline=type(pipe).__name__, extra=extra,
                     scheduler_name=name, load=absent)
