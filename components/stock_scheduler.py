"""The stock diffusers scheduler a student folder is saved with, so that the library's own
``StableDiffusionPipeline.from_pretrained(student)(prompt, num_inference_steps=N,
guidance_scale=s)`` computes what ``Student.generate`` computes.

Per generator kind (``components.generation.GeneratorSpec``):

- ``x0_from_eps`` at t = T − 1 on unit noise (SwiftBrush, DMD2): ``DDIMScheduler`` with trailing
  spacing and ``set_alpha_to_one``: one step at t = 999 that returns the x0 prediction.
- ``x0_from_eps`` on ``σ_t z`` (SiD) or at another t: ``EulerDiscreteScheduler`` with one Karras
  sigma equal to the student's σ_t / α_t. Its initial noise is scaled by that sigma and its model
  input by 1 / √(σ² + 1), which is exactly ``σ_t z`` (trailing spacing) or ``z`` (leading).
- ``x0_from_eps`` with N > 1 steps (DMD2's few-step generator): ``LCMScheduler`` with
  ``original_inference_steps = N``, so ``num_inference_steps = n`` steps on the n-step grid
  ([999, 749, 499, 249] for 4, [999, 499] for 2) for every n in ``student.json:
  sampling_steps``. Each step takes x̂0 and re-noises it to the next timestep with fresh noise
  drawn from the call's generator, after the starting noise: the order ``Student.generate`` draws
  in, so one generator per image reproduces it. LCM's boundary condition ``c_skip x_t + c_out x̂0``
  (c_skip = σ_d² / ((s t)² + σ_d²), c_out = s t / √((s t)² + σ_d²)) is made exactly x̂0 with
  ``timestep_scaling`` s = 1e15: c_out rounds to 1 and c_skip is below 1e-35 on the grid
  (DMD2's own model card keeps s = 10, which mixes 4e-8 of x_t into x̂0 at t = 249).
- ``ddim`` (Meng et al.): ``DDIMScheduler`` with trailing spacing, when its step size T // N lands
  on the student's own trailing grid (N = 1, 2, 4, 8, ...). A w-conditioned UNet has
  ``time_cond_proj_dim``, so the pipeline itself feeds w = s − 1 as ``timestep_cond`` and skips
  classifier-free guidance: the call passes ``guidance_scale = 1 + w``.
- ``rectified_flow`` (InstaFlow): no stock scheduler steps ``x ← x + v / N`` from t = 1000 (the
  flow-matching scheduler steps against the velocity and lacks the ``scale_model_input`` that
  ``StableDiffusionPipeline`` calls), so the folder says so and keeps the teacher's scheduler.

Every other kind is one-step or unconditioned: ``guidance_scale = 1`` (no CFG; the student has
the guidance distilled in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from components.generation import GeneratorSpec, trailing_timesteps

LCM_EXACT_X0_SCALING = 1e15  # LCM's boundary condition is x̂0 (see the module docstring)


@dataclass(frozen=True)
class StockCall:
    """How a plain diffusers user reproduces the student: the scheduler to save (None: keep the
    teacher's) and the pipeline call's arguments, or why it cannot."""

    scheduler: Any | None
    num_inference_steps: int
    guidance_scale: float
    reason: str | None = None  # set when no stock scheduler reproduces the student
    pipeline: str = "StableDiffusionPipeline"
    extra: dict = field(default_factory=dict)  # further call arguments (a flow's sigmas)
    scheduler_name: str | None = None  # the saved scheduler's class when ``scheduler`` is None
    load: dict = field(default_factory=dict)  # from_pretrained arguments (parts saved absent)

    def describe(self) -> dict:
        """The ``diffusers`` entry of ``student.json``."""
        if self.reason is not None:
            return {"reproduces_student": False, "reason": self.reason}
        name = self.scheduler_name or type(self.scheduler).__name__
        out = {"reproduces_student": True, "pipeline": self.pipeline, "scheduler": name,
               "call": {"num_inference_steps": self.num_inference_steps,
                        "guidance_scale": self.guidance_scale, **self.extra}}
        if self.load:
            out["from_pretrained"] = self.load
        return out


def stock_call(scheduler: Any, spec: GeneratorSpec) -> StockCall:
    """The stock scheduler (built from the teacher's ``scheduler`` config, same ᾱ table) and call
    that reproduce ``spec``; a ``StockCall`` with ``reason`` where none does."""
    T = int(scheduler.config.num_train_timesteps)
    if spec.kind == "rectified_flow":
        return StockCall(None, spec.steps, 1.0, reason=(
            "rectified-flow Euler (x <- x + v/N from t = 1000) has no stock diffusers scheduler; "
            "generate with components.generation.load_student"))
    if spec.kind == "ddim":
        scale = 1.0 + spec.guidance_weight if spec.w_dim else 1.0
        return _checked(_ddim(scheduler), scheduler, spec.steps, scale,
                        trailing_timesteps(T, spec.steps))
    if spec.steps > 1:
        return _checked(_lcm(scheduler, spec.steps), scheduler, spec.steps, 1.0,
                        trailing_timesteps(T, spec.steps))
    if spec.input_scale == "unit" and spec.t == T - 1:
        return _checked(_ddim(scheduler), scheduler, 1, 1.0, [T - 1])
    return _checked(_euler(scheduler, spec), scheduler, 1, 1.0, [spec.t])


def _ddim(scheduler: Any) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing",
                                     steps_offset=1, set_alpha_to_one=True, clip_sample=False,
                                     thresholding=False)


def _lcm(scheduler: Any, steps: int) -> Any:
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(scheduler.config, original_inference_steps=steps,
                                    timestep_scaling=LCM_EXACT_X0_SCALING, set_alpha_to_one=True,
                                    clip_sample=False, thresholding=False)


def _euler(scheduler: Any, spec: GeneratorSpec) -> Any:
    from diffusers import EulerDiscreteScheduler

    abar = scheduler.alphas_cumprod.numpy()  # float32, as the Euler scheduler computes it
    sigma = float(((1 - abar[spec.t]) / abar[spec.t]) ** 0.5)
    spacing = "trailing" if spec.input_scale == "sigma" else "leading"
    return EulerDiscreteScheduler.from_config(scheduler.config, use_karras_sigmas=True,
                                              sigma_max=sigma, timestep_spacing=spacing,
                                              final_sigmas_type="zero", steps_offset=1)


def _checked(stock: Any, teacher: Any, steps: int, scale: float, grid: list[int]) -> StockCall:
    """``stock`` if its ᾱ table is the teacher's and its N-step timesteps are ``grid`` (and, for
    DDIM, each step lands on the next grid point and the last on the clean end)."""
    if not torch.equal(stock.alphas_cumprod, teacher.alphas_cumprod):
        return StockCall(None, steps, scale, reason=(
            f"{type(stock).__name__} would change the noise schedule of this teacher"))
    stock.set_timesteps(steps)
    got = [float(t) for t in stock.timesteps]
    if any(abs(a - b) > 1e-3 for a, b in zip(got, grid, strict=True)):
        return StockCall(None, steps, scale, reason=(
            f"{type(stock).__name__} steps at {got}, not at the student's {grid}"))
    if type(stock).__name__ == "DDIMScheduler" and not _ddim_lands_on(grid, stock):
        return StockCall(None, steps, scale, reason=(
            f"DDIMScheduler's step size does not land on the student's grid {grid}"))
    return StockCall(stock, steps, scale)


def _ddim_lands_on(grid: list[int], ddim: Any) -> bool:
    """DDIM steps from t to t − T // N: each step must reach the next grid point, the last one
    a negative timestep (the clean end, ᾱ = 1 with ``set_alpha_to_one``)."""
    stride = ddim.config.num_train_timesteps // len(grid)
    landed = [t - stride for t in grid]
    return landed[:-1] == grid[1:] and landed[-1] < 0
