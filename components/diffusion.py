"""The diffusion math every method speaks: the ``Denoiser`` protocol, the noise schedule,
ε/x0/v conversions and the two classifier-free guidance conventions.

Notation (VP / DDPM, as in SD's scheduler): ``x_t = α_t x_0 + σ_t ε`` with ``α_t = sqrt(ᾱ_t)`` and
``σ_t = sqrt(1 - ᾱ_t)``. Guidance is written two ways and kept apart by name:
``guidance_scale`` s (diffusers/Imagen: ``u + s (c - u)``) and ``guidance_weight`` w (Meng/LCM:
``(1 + w) c - w u``), related by ``s = 1 + w``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

PredictionType = Literal["epsilon", "sample", "v_prediction"]


class Denoiser(Protocol):
    """A network seen as ``(x_t, t, cond) -> prediction`` over one noise schedule.

    ``prediction_type`` says what the output is (ε, x0 or v); ``schedule`` gives α_t and σ_t.
    Diffusers UNets, tiny random models and closed-form analytic teachers all satisfy it.
    """

    prediction_type: PredictionType
    schedule: NoiseSchedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete VP schedule given by its ᾱ table (one entry per integer timestep)."""

    alphas_cumprod: torch.Tensor  # (T,) float64

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """Use the scheduler's own ᾱ table (never a hard-coded constant)."""
        return cls(torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clone())

    @classmethod
    def scaled_linear(cls, steps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> NoiseSchedule:
        """Stable Diffusion's schedule: betas linear in sqrt space."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α_t and σ_t for integer timesteps ``t`` (B,), shaped to broadcast against ``like``."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = abar.sqrt().view(shape).to(like.dtype)
        sigma = (1.0 - abar).sqrt().view(shape).to(like.dtype)
        return alpha, sigma

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = α_t x0 + σ_t ε``."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    return (x_t - alpha * x0) / sigma


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
              sigma: torch.Tensor) -> torch.Tensor:
    return alpha * x_t - sigma * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
    return sigma * x_t + alpha * v


def v_from_eps_x0(eps: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor,
                  sigma: torch.Tensor) -> torch.Tensor:
    return alpha * eps - sigma * x0


def to_eps(pred: torch.Tensor, kind: PredictionType, x_t: torch.Tensor, alpha: torch.Tensor,
           sigma: torch.Tensor) -> torch.Tensor:
    """Convert a network output of type ``kind`` into an ε prediction."""
    if kind == "epsilon":
        return pred
    if kind == "sample":
        return eps_from_x0(x_t, pred, alpha, sigma)
    if kind == "v_prediction":
        return eps_from_v(x_t, pred, alpha, sigma)
    raise ValueError(f"unknown prediction type {kind!r}; expected epsilon, sample or v_prediction")


def to_x0(pred: torch.Tensor, kind: PredictionType, x_t: torch.Tensor, alpha: torch.Tensor,
          sigma: torch.Tensor) -> torch.Tensor:
    """Convert a network output of type ``kind`` into an x0 prediction."""
    if kind == "epsilon":
        return x0_from_eps(x_t, pred, alpha, sigma)
    if kind == "sample":
        return pred
    if kind == "v_prediction":
        return x0_from_v(x_t, pred, alpha, sigma)
    raise ValueError(f"unknown prediction type {kind!r}; expected epsilon, sample or v_prediction")


def guidance_scale_to_weight(scale: float) -> float:
    """s (diffusers) → w (Meng/LCM): ``w = s - 1``."""
    return scale - 1.0


def guidance_weight_to_scale(weight: float) -> float:
    """w (Meng/LCM) → s (diffusers): ``s = 1 + w``."""
    return 1.0 + weight


def apply_guidance_scale(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance with scale s: ``u + s (c - u)`` (s = 1: no guidance)."""
    return uncond + scale * (cond - uncond)


def apply_guidance_weight(uncond: torch.Tensor, cond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance with weight w: ``(1 + w) c - w u`` (w = 0: no guidance)."""
    return (1.0 + weight) * cond - weight * uncond


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of one scalar per row (B,): [cos | sin] over geometric
    frequencies from 1 to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs.to(x.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Embedding (B, dim) of a guidance weight w (B,) for a w-conditioned network, fed as
    ``timestep_cond`` (diffusers' ``time_cond_proj_dim`` path): [sin | cos] of 1000 w over the
    frequencies 10000^(−k / (dim/2 − 1)), zero-padded to an odd ``dim``. These are the features
    diffusers' own pipelines compute for such a UNet (LCM's ``get_guidance_scale_embedding``, from
    w = s − 1), so a plain ``StableDiffusionPipeline`` feeds a w-conditioned student what it
    was trained on."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = (w * 1000.0).float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def _predict(convert, denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
             timestep_cond: torch.Tensor | None) -> torch.Tensor:
    alpha, sigma = denoiser.schedule.alpha_sigma(t, x_t)
    out = (denoiser(x_t, t, cond) if timestep_cond is None
           else denoiser(x_t, t, cond, timestep_cond=timestep_cond))
    return convert(out, denoiser.prediction_type, x_t, alpha, sigma)


def predict_eps(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
    """ε prediction of any denoiser, whatever its native prediction type."""
    return _predict(to_eps, denoiser, x_t, t, cond, timestep_cond)


def predict_x0(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
               timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
    """x0 prediction of any denoiser, whatever its native prediction type."""
    return _predict(to_x0, denoiser, x_t, t, cond, timestep_cond)


def guided(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
           guidance_scale: float, kind: str = "eps") -> torch.Tensor:
    """CFG prediction (``kind`` "eps" or "x0") with scale s, cond and uncond batched in one call
    as [uncond; cond]. CFG is linear, so guiding x0 equals converting the guided ε."""
    predict = predict_eps if kind == "eps" else predict_x0
    if guidance_scale == 1.0:
        return predict(denoiser, x_t, t, cond)
    both = predict(denoiser, torch.cat([x_t, x_t]), torch.cat([t, t]),
                   concat_conditioning(uncond, cond))
    u, c = both.chunk(2)
    return apply_guidance_scale(u, c, guidance_scale)


def guided_eps(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
               guidance_scale: float) -> torch.Tensor:
    """CFG ε with scale s; cond and uncond are batched into one call ([uncond; cond])."""
    return guided(denoiser, x_t, t, cond, uncond, guidance_scale, "eps")


def concat_conditioning(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch (tensors, or dataclasses of tensors)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if hasattr(a, "concat"):
        return a.concat(b)
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")
