"""Noise schedules beyond SD's discrete VP table: rectified flow with a timestep shift.

Rectified flow (SD3, FLUX.1, SANA): ``x_t = (1 − σ) x0 + σ ε``, so in the VP notation of
``components.diffusion`` ``α = 1 − σ``; the network predicts the velocity ``u = ε − x0``
(``prediction_type: flow``). Time: the schedule's timestep ``t`` is continuous on ``[−1, T − 1]``
(T = ``num_train_timesteps``) with

    σ(t) = shift(s, k),   s = (t + 1) / T,   shift(s, k) = k s / (1 + (k − 1) s)

so the integer timesteps 0 … T − 1 are exactly the training table of diffusers'
``FlowMatchEulerDiscreteScheduler`` (index i ↔ σ = shift((i + 1) / T)); t = T − 1 is pure noise
(σ = 1), and a method that draws t ~ U{t_min, …, t_max} draws σ on the shifted grid. The
transformer itself is fed ``T σ(t)`` (SD3) or ``σ(t)`` (FLUX), each adapter knows which.

The shift k comes from the pipeline's own scheduler config: SD3's static ``shift`` (3.0), or
FLUX's resolution-dependent one when ``use_dynamic_shifting`` is set: ``k = exp(μ)`` with μ linear
in the image's token count between ``(base_image_seq_len, base_shift)`` and
``(max_image_seq_len, max_shift)`` (``time_shift_type: exponential``, as FluxPipeline computes
it; ``e^μ / (e^μ + 1/s − 1)`` is the same map as ``shift(s, e^μ)``), or SANA's ``flow_shift`` of
its ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas`` (the same static shift map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift ``k s / (1 + (k − 1) s)`` (k > 1 spends more time at high noise)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of ``shift_sigma``: ``s = σ / (k − (k − 1) σ)``."""
    return sigma / (shift - (shift - 1.0) * sigma)


def flow_sigma(t: torch.Tensor, shift: float, num_timesteps: int = 1000) -> torch.Tensor:
    """σ of the (continuous) timestep ``t``: ``shift((t + 1) / T)``."""
    return shift_sigma((t + 1.0) / num_timesteps, shift)


def flow_timestep(sigma: torch.Tensor, shift: float, num_timesteps: int = 1000) -> torch.Tensor:
    """The (continuous) timestep of σ, inverse of ``flow_sigma``."""
    return unshift_sigma(sigma, shift) * num_timesteps - 1.0


def resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's shift for an image of ``image_seq_len`` tokens: ``exp(μ)``, μ linear in the token
    count from ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow with a timestep shift; see the module docstring."""

    shift: float = 1.0
    num_timesteps: int = 1000

    @classmethod
    def from_scheduler(cls, scheduler: Any, image_seq_len: int | None = None) -> FlowSchedule:
        """The schedule of a ``FlowMatchEulerDiscreteScheduler``, or of a DPM-Solver on flow sigmas
    (SANA's: ``use_flow_sigmas``, ``flow_shift``), from its config, never a constant.

        With ``use_dynamic_shifting`` the shift depends on the resolution: ``image_seq_len``
        (latent tokens after patching) is then required."""
        cfg = scheduler.config
        if cfg.get("use_flow_sigmas"):  # SANA's DPM-Solver on flow sigmas: a static shift
            if cfg.get("prediction_type") != "flow_prediction":
                raise ValueError("a scheduler with use_flow_sigmas must predict the flow "
                                 f"(prediction_type flow_prediction), not "
                                 f"{cfg.get('prediction_type')!r}")
            return cls(float(cfg.get("flow_shift", 1.0)),
                       int(cfg.get("num_train_timesteps", 1000)))
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                   "use_beta_sigmas", "invert_sigmas") if cfg.get(k)]
        if cfg.get("shift_terminal") or unsupported:
            raise ValueError(f"flow scheduler options {unsupported or ['shift_terminal']} are "
                             "not supported; use a plain shifted FlowMatchEulerDiscreteScheduler")
        steps = int(cfg.get("num_train_timesteps", 1000))
        if not cfg.get("use_dynamic_shifting", False):
            return cls(float(cfg.get("shift", 1.0)), steps)
        if image_seq_len is None:
            raise ValueError("this scheduler shifts by resolution (use_dynamic_shifting): "
                             "give the image's token count")
        if cfg.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("only the exponential resolution shift (FLUX's) is supported")
        k = resolution_shift(image_seq_len, cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        return cls(k, steps)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) in float64, (B,) for timesteps (B,) (integer or continuous)."""
        return flow_sigma(t.double(), self.shift, self.num_timesteps).clamp(0.0, 1.0)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous timestep (B,) of σ (B,)."""
        return flow_timestep(sigma.double(), self.shift, self.num_timesteps)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What diffusers' flow transformers are fed at ``t``: ``T σ(t)`` (float32)."""
        return (self.num_timesteps * self.sigma(t)).float()

    def snap(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as this schedule reads them: continuous, so unchanged (float)."""
        return t.float()

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``α = 1 − σ(t)`` and ``σ(t)`` for timesteps ``t`` (B,), shaped to broadcast against
        ``like``."""
        sigma = self.sigma(t.to(like.device))
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (1.0 - sigma).view(shape).to(like.dtype), sigma.view(shape).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 − σ) x0 + σ ε``."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps


def schedule_from_scheduler(scheduler: Any, image_seq_len: int | None = None):
    """The schedule a pipeline's scheduler trains on: the VP ᾱ table of SD's schedulers or the
    shifted rectified flow of ``FlowMatchEulerDiscreteScheduler``."""
    from components.diffusion import NoiseSchedule

    flow = type(scheduler).__name__.startswith("FlowMatch")
    if flow or scheduler.config.get("use_flow_sigmas"):
        return FlowSchedule.from_scheduler(scheduler, image_seq_len)
    if hasattr(scheduler, "alphas_cumprod"):
        return NoiseSchedule.from_scheduler(scheduler)
    raise ValueError(f"scheduler {type(scheduler).__name__} has neither a VP ᾱ table nor a "
                     "flow-matching config; supported: DDIM/DDPM/Euler-style VP schedulers, "
                     "FlowMatchEulerDiscreteScheduler and DPM-Solver with use_flow_sigmas")
