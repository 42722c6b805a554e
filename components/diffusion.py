"""The diffusion math every method speaks: the ``Denoiser`` protocol, the noise schedule,
ε/x0/v/flow-velocity conversions and the two classifier-free guidance conventions.

Notation: ``x_t = α_t x_0 + σ_t ε``. SD's discrete VP schedule (``NoiseSchedule``) has
``α_t = sqrt(ᾱ_t)`` and ``σ_t = sqrt(1 - ᾱ_t)``; rectified flow (``components.schedules``) has
``α_t = 1 − σ_t``. Prediction types: ``epsilon`` (ε), ``sample`` (x0), ``v_prediction``
(``v = α ε − σ x0``) and ``flow`` (the rectified path's velocity ``u = ε − x0``); every
conversion below takes (α, σ), so each holds on either schedule. Guidance is written two ways and kept apart by name:
``guidance_scale`` s (diffusers/Imagen: ``u + s (c - u)``) and ``guidance_weight`` w (Meng/LCM:
``(1 + w) c - w u``), related by ``s = 1 + w``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

PredictionType = Literal["epsilon", "sample", "v_prediction", "flow"]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


class Denoiser(Protocol):
    """A network seen as ``(x_t, t, cond) -> prediction`` over one noise schedule.

    ``prediction_type`` says what the output is (ε, x0, v or flow velocity); ``schedule`` gives
    α_t and σ_t of the timesteps ``t`` (B,): integers for the discrete VP table, any real in
    [−1, T − 1] for rectified flow. Diffusers UNets and flow transformers, tiny random models and
    closed-form analytic teachers all satisfy it. A network with ``embedded_guidance`` (FLUX.1-dev)
    takes the CFG scale as an input (``guidance=s``) instead of being called twice.
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

    def snap(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as this discrete table reads them: rounded to its integer entries."""
        return t.round().long().clamp(0, self.num_timesteps - 1)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What a diffusers UNet is fed at ``t``: the timestep itself."""
        return t

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


def x0_from_flow(x_t: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor,
                 sigma: torch.Tensor) -> torch.Tensor:
    """x0 from the velocity ``u = ε − x0``: ``x_t = (α + σ) x0 + σ u`` (α + σ = 1 on the flow)."""
    return (x_t - sigma * u) / (alpha + sigma)


def eps_from_flow(x_t: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor,
                  sigma: torch.Tensor) -> torch.Tensor:
    """ε from the velocity ``u = ε − x0``: ``x_t + α u = (α + σ) ε``."""
    return (x_t + alpha * u) / (alpha + sigma)


def flow_from_eps_x0(eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The rectified path's velocity ``u = dx_t/dσ = ε − x0``."""
    return eps - x0


def flow_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """Flow velocity from a v prediction (through ε and x0). ``x0_from_v``/``eps_from_v`` use
    α² + σ² = 1 (VP); here the general inverse, ``(α x_t − σ v) / (α² + σ²)`` and
    ``(σ x_t + α v) / (α² + σ²)``, so it holds on the flow schedule too."""
    norm = alpha**2 + sigma**2
    return flow_from_eps_x0((sigma * x_t + alpha * v) / norm, (alpha * x_t - sigma * v) / norm)


def v_from_flow(x_t: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """v prediction from a flow velocity (through ε and x0)."""
    return v_from_eps_x0(eps_from_flow(x_t, u, alpha, sigma), x0_from_flow(x_t, u, alpha, sigma),
                         alpha, sigma)


def _unknown(kind: str) -> ValueError:
    return ValueError(f"unknown prediction type {kind!r}; expected one of "
                      f"{', '.join(PREDICTION_TYPES)}")


def to_eps(pred: torch.Tensor, kind: PredictionType, x_t: torch.Tensor, alpha: torch.Tensor,
           sigma: torch.Tensor) -> torch.Tensor:
    """Convert a network output of type ``kind`` into an ε prediction."""
    if kind == "epsilon":
        return pred
    if kind == "sample":
        return eps_from_x0(x_t, pred, alpha, sigma)
    if kind == "v_prediction":
        return eps_from_v(x_t, pred, alpha, sigma)
    if kind == "flow":
        return eps_from_flow(x_t, pred, alpha, sigma)
    raise _unknown(kind)


def to_x0(pred: torch.Tensor, kind: PredictionType, x_t: torch.Tensor, alpha: torch.Tensor,
          sigma: torch.Tensor) -> torch.Tensor:
    """Convert a network output of type ``kind`` into an x0 prediction."""
    if kind == "epsilon":
        return x0_from_eps(x_t, pred, alpha, sigma)
    if kind == "sample":
        return pred
    if kind == "v_prediction":
        return x0_from_v(x_t, pred, alpha, sigma)
    if kind == "flow":
        return x0_from_flow(x_t, pred, alpha, sigma)
    raise _unknown(kind)


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


def _call(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
          timestep_cond: torch.Tensor | None = None,
          guidance: torch.Tensor | None = None) -> torch.Tensor:
    """The raw network output; the optional inputs are passed only when given."""
    extra = {k: v for k, v in (("timestep_cond", timestep_cond), ("guidance", guidance))
             if v is not None}
    return denoiser(x_t, t, cond, **extra)


def _predict(convert, denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
             timestep_cond: torch.Tensor | None, guidance: torch.Tensor | None = None):
    alpha, sigma = denoiser.schedule.alpha_sigma(t, x_t)
    out = _call(denoiser, x_t, t, cond, timestep_cond, guidance)
    return convert(out, denoiser.prediction_type, x_t, alpha, sigma)


def predict_eps(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                timestep_cond: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
    """ε prediction of any denoiser, whatever its native prediction type."""
    return _predict(to_eps, denoiser, x_t, t, cond, timestep_cond, guidance)


def predict_x0(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
               timestep_cond: torch.Tensor | None = None,
               guidance: torch.Tensor | None = None) -> torch.Tensor:
    """x0 prediction of any denoiser, whatever its native prediction type."""
    return _predict(to_x0, denoiser, x_t, t, cond, timestep_cond, guidance)


def predict_eps_x0(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                   timestep_cond: torch.Tensor | None = None,
                   guidance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, x0) from one network call, each converted from the native output (no ε → x0
    division by α, which is 0 at the pure-noise end of a flow)."""
    alpha, sigma = denoiser.schedule.alpha_sigma(t, x_t)
    out = _call(denoiser, x_t, t, cond, timestep_cond, guidance)
    kind = denoiser.prediction_type
    return to_eps(out, kind, x_t, alpha, sigma), to_x0(out, kind, x_t, alpha, sigma)


def predict_velocity(denoiser: Denoiser, x: torch.Tensor, tau: float | torch.Tensor,
                     cond: Any) -> torch.Tensor:
    """The velocity dx/dτ of the path from noise (τ = 0) to data (τ = 1), InstaFlow's direction.

    A flow network (x = (1 − σ) x0 + σ ε with σ = 1 − τ) gives it as ``−u`` at the timestep of
    σ = 1 − τ. Any other network is *read* as a velocity network called at ``1000 (1 − τ)``, as
    InstaFlow re-trains SD's ε-UNet into a velocity network (its raw output)."""
    if denoiser.prediction_type == "flow":
        sigma = torch.as_tensor(1.0 - tau, dtype=torch.float64, device=x.device)
        t = denoiser.schedule.timestep(sigma.expand(x.shape[0]))
        return -denoiser(x, t, cond)
    if not torch.is_tensor(tau):
        tau_t = torch.full((x.shape[0],), 1000.0 * (1.0 - tau), device=x.device)
        return denoiser(x, tau_t, cond)
    return denoiser(x, 1000.0 * (1.0 - tau), cond)


def _per_sample(scale: float | torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """A CFG scale (float, or per-sample broadcastable) as a (B,) tensor."""
    if torch.is_tensor(scale):
        return scale.flatten().to(x_t.device).float().expand(x_t.shape[0])
    return torch.full((x_t.shape[0],), float(scale), device=x_t.device)


def w_conditioning(denoiser: Denoiser, w: torch.Tensor, w_dim: int) -> dict:
    """The inputs that condition a w-conditioned network on guidance weights w (B,): the
    embedding fed as ``timestep_cond``, or, for a network with ``embedded_guidance`` (already
    guidance-distilled, FLUX.1-dev), its own guidance input ``s = 1 + w``."""
    if getattr(denoiser, "embedded_guidance", False):
        return {"guidance": guidance_weight_to_scale(w)}
    return {"timestep_cond": guidance_embedding(w, w_dim)}


def guided_output(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                  uncond: Any, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """The CFG-guided raw network output with scale s ([uncond; cond] in one call). A network
    with ``embedded_guidance`` has no true CFG: one call with ``guidance = s``, ``uncond``
    unused."""
    return _guide(_call, denoiser, x_t, t, cond, uncond, guidance_scale)


def _guide(predict, denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
           uncond: Any, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """CFG of ``predict`` (the raw output, ε or x0): one call with ``guidance = s`` for an
    embedded-guidance network, one conditional call at s = 1, else [uncond; cond] in one call."""
    if getattr(denoiser, "embedded_guidance", False):
        return predict(denoiser, x_t, t, cond, guidance=_per_sample(guidance_scale, x_t))
    if not torch.is_tensor(guidance_scale) and guidance_scale == 1.0:
        return predict(denoiser, x_t, t, cond)
    both = predict(denoiser, torch.cat([x_t, x_t]), torch.cat([t, t]),
                   concat_conditioning(uncond, cond))
    u, c = both.chunk(2)
    return apply_guidance_scale(u, c, guidance_scale)


def guided(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
           guidance_scale: float | torch.Tensor, kind: str = "eps") -> torch.Tensor:
    """CFG prediction (``kind`` "eps" or "x0") with scale s, cond and uncond batched in one call
    as [uncond; cond]. CFG is linear, so guiding x0 equals converting the guided ε. ``s`` may be
    a tensor of per-sample scales shaped to broadcast against ``x_t`` (e.g. (B, 1, 1, 1)).
    A network with ``embedded_guidance`` is called once, with ``guidance = s``."""
    predict = predict_eps if kind == "eps" else predict_x0
    return _guide(predict, denoiser, x_t, t, cond, uncond, guidance_scale)


def guided_eps(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
               guidance_scale: float) -> torch.Tensor:
    """CFG ε with scale s; cond and uncond are batched into one call ([uncond; cond])."""
    return guided(denoiser, x_t, t, cond, uncond, guidance_scale, "eps")


def guided_eps_x0(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                  uncond: Any, guidance_scale: float | torch.Tensor):
    """(ε, x0) of the CFG-guided output with scale s, from one (batched) call."""
    out = guided_output(denoiser, x_t, t, cond, uncond, guidance_scale)
    alpha, sigma = denoiser.schedule.alpha_sigma(t, x_t)
    kind = denoiser.prediction_type
    return to_eps(out, kind, x_t, alpha, sigma), to_x0(out, kind, x_t, alpha, sigma)


def concat_conditioning(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch (tensors, or dataclasses of tensors)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if hasattr(a, "concat"):
        return a.concat(b)
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")
