"""InstaFlow: text-conditioned reflow into a 2-rectified flow, then one-step distillation.

Liu, Zhang, Ma, Peng, Liu, "InstaFlow: One Step is Enough for High-Quality Diffusion-Based
Text-to-Image Generation", ICLR 2024, arXiv:2309.06380 (v2). No training code was released; the
recipe follows the paper (Sec. 3–4, App.) and the released inference pipeline's conventions: the
network predicts a velocity, sampling integrates ``x ← x + v(x, t_unet) / N`` from noise (τ = 0)
to image (τ = 1) with ``t_unet = 1000 (1 − τ)``.

Phase 1 — reflow (the first ``reflow_fraction`` of the iterations). Pairs (X0, X1) come
from the teacher pair cache (``cache_teacher``: noise X0 and the teacher's guided ODE solution
X1; the paper's teacher solver is 25-step DPM-Solver, ours is 25-step DDIM, both solve the same
probability-flow ODE). With τ ~ U[0, 1] and X_τ = τ X1 + (1 − τ) X0:
    L_reflow = ‖(X1 − X0) − v(X_τ, τ | y)‖²
Phase 2 — distillation. The 2-rectified flow from the end of phase 1 is frozen; for each
noise X0 its own ODE solution X1' (``distill_ode_steps`` Euler steps, CFG ``distill_guidance``)
is the target of the one-step student (initialised from the 2-RF), the paper's distillation
loss:
    L_distill = D(X1', X0 + v(X0, 0 | y)),   D = L2, then LPIPS for the last ``lpips_fraction``
The paper generates a fixed set of new pairs for phase 2; we draw a fresh X0 from the iteration's
generator for every sample and solve the 2-RF ODE from it (the same distribution, never a
repeated pair: the pair cache's noises are phase 1's only). The 2-RF is the EMA of phase 1, and
the student starts from it with a fresh optimizer state and a fresh EMA (a new run, as in the
paper; ``components.methods.Method``). LPIPS compares decoded images and needs ImageNet backbone
weights; without them the run stops before training, naming what to supply.

On a flow teacher the teacher *is* a 1-rectified flow: with σ = 1 − τ its velocity from noise to
image is dx/dτ = −u(x, t(σ)) (``components.diffusion.predict_velocity``, t the timestep of σ on
its shifted schedule), so the student starts as the teacher's own ODE, L_reflow regresses −u on
X1 − X0, i.e. u on the straight-line velocity X0 − X1 = ε − x0 of the teacher's own pairs (the
teacher's flow-matching loss on its coupled pairs), and the one-step student is X0 − u(X0, σ = 1).
A UNet teacher's network is instead *read* as a velocity network at t = 1000 (1 − τ), as the
paper re-trains SD's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from components.diffusion import apply_guidance_scale, concat_conditioning, predict_velocity
from components.ema import EMAConfig
from components.generation import GeneratorSpec, rectified_flow_sample
from components.methods import Batch, GroupSpec, Teacher, register


@dataclass(frozen=True)
class InstaFlowConfig:
    """Defaults from the paper (SD1.5): AdamW, lr 1e-6, clip 1, 1000 warm-up steps; reflow took
    95K of 134.5K iterations (0.7); LPIPS took 18K of the 39.5K distillation ones (0.45). EMA
    0.9999 per a secondary summary (no training code was released); Distillery applies it with
    diffusers' warm-up so that a phase's average does not keep its initial weights."""

    lr: float = 1e-6
    reflow_fraction: float = 0.7
    # Prompts dropped to the empty prompt during reflow, so the 2-RF has the unconditional
    # branch its phase-2 CFG needs (the paper guides the 2-RF with 1.5 but does not state the
    # rate; 0.1 is SD's caption dropout)
    null_prompt_prob: float = 0.1
    distill_ode_steps: int = 25
    distill_guidance: float = 1.5
    lpips_fraction: float = 0.45
    lpips_net: str = "alex"
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    max_grad_norm: float = 1.0
    sample_steps: int = 1  # Euler steps of the saved student
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(kind="warmup", decay=0.9999))

    def validate(self) -> None:
        if not 0.0 <= self.reflow_fraction < 1.0:
            raise ValueError("reflow_fraction must be in [0, 1)")
        if not 0.0 <= self.lpips_fraction <= 1.0:
            raise ValueError("lpips_fraction must be in [0, 1]")
        if self.distill_ode_steps < 1 or self.sample_steps < 1:
            raise ValueError("distill_ode_steps and sample_steps must be >= 1")


class LpipsUnavailable(FileNotFoundError):
    """LPIPS (its package or its backbone's ImageNet weights) is not on this machine."""


def load_lpips(net: str):
    """LPIPS with its ImageNet backbone, or a clear error saying which weights to supply."""
    try:
        import lpips
    except ImportError as err:
        raise LpipsUnavailable("InstaFlow's LPIPS phase needs the `lpips` package; install "
                               "the project's dependencies (`uv sync`)") from err
    try:
        return lpips.LPIPS(net=net, pretrained=True, verbose=False).eval().requires_grad_(False)
    except (OSError, RuntimeError) as err:  # the backbone download fails offline
        raise LpipsUnavailable(
            f"InstaFlow's LPIPS phase needs the torchvision ImageNet weights of '{net}' "
            f"(e.g. alexnet-owt-7be5be79.pth), which could not be loaded ({err}). Put the file "
            "into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/) on this "
            "machine, or set `distill.methods.instaflow.lpips_fraction: 0` to distil with L2 "
            "only.") from None


class InstaFlow:
    """Reflow then one-step distillation; see the module docstring."""

    needs_pairs = True
    lora_unsupported = (
        "InstaFlow turns the ε-prediction teacher into a velocity field (reflow) and distils "
        "the reflowed 2-rectified flow, not the teacher: a LoRA over the teacher is not that "
        "recipe (the paper trains full weights)")
    student_groups = ("reflow", "distill")

    def __init__(self, cfg: InstaFlowConfig, teacher: Teacher, steps: int):
        self.cfg = cfg
        self.ema = cfg.ema
        self.reflow_end = round(cfg.reflow_fraction * steps)
        self.lpips_start = steps - round(cfg.lpips_fraction * (steps - self.reflow_end))
        self.phase_starts = (self.reflow_end,) if self.reflow_end > 0 else ()
        self.spec = GeneratorSpec(kind="rectified_flow", steps=cfg.sample_steps)
        clip, warm = cfg.max_grad_norm, cfg.warmup_steps
        self.groups = (GroupSpec("reflow", max_grad_norm=clip, stop=self.reflow_end, warmup=warm,
                                 optimizer="student"),
                       GroupSpec("distill", max_grad_norm=clip, start=self.reflow_end,
                                 warmup=warm, optimizer="student"))
        self.v = teacher.trainable_copy()  # 2-RF during phase 1, the one-step student after
        # the frozen 2-RF of phase 2, set from phase 1's EMA when it begins (without reflow: the
        # teacher itself)
        self.rf2 = teacher.frozen_copy()
        self.decode = teacher.decode
        self.lpips = None
        if self.lpips_start < steps:
            if self.decode is None:
                raise ValueError("InstaFlow's LPIPS phase needs the teacher's VAE decoder")
            self.lpips = load_lpips(cfg.lpips_net)

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        return list(self.v.parameters())

    def make_optimizer(self, name: str) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.v.parameters(), lr=self.cfg.lr,
                                 betas=tuple(self.cfg.adam_betas),
                                 weight_decay=self.cfg.weight_decay)

    @torch.no_grad()
    def begin_phase(self, step: int) -> None:
        """Distillation begins: freeze the 2-RF (the student holds phase 1's EMA now)."""
        self.rf2.load_state_dict(self.v.state_dict())

    def student(self) -> torch.nn.Module:
        return self.v

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.v, "rf2": self.rf2}

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        if group == "reflow":
            return self.reflow_loss(batch)
        return self.distill_loss(batch)

    def reflow_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Reflow per sample (B,): velocity regression on the straight line X0 → X1."""
        X0, X1 = batch.z, batch.x1
        tau = torch.rand(X0.shape[0], generator=batch.generator).to(X0.device)
        drop = torch.rand(X0.shape[0], generator=batch.generator) < self.cfg.null_prompt_prob
        cond = batch.cond.where(drop.to(X0.device), batch.uncond)
        tau_ = tau.view(-1, *[1] * (X0.ndim - 1))
        X_tau = tau_ * X1 + (1.0 - tau_) * X0
        v = predict_velocity(self.v, X_tau, tau, cond)
        per_sample = (((X1 - X0) - v) ** 2).flatten(1).mean(1)
        return per_sample, {"loss_reflow": per_sample.mean()}

    @torch.no_grad()
    def _rf2_solution(self, X0: torch.Tensor, batch: Batch) -> torch.Tensor:
        """X1' = the 2-RF's guided Euler ODE solution from X0."""
        n, s = self.cfg.distill_ode_steps, self.cfg.distill_guidance
        both = concat_conditioning(batch.uncond, batch.cond)
        x = X0
        for i in range(n):
            v_u, v_c = predict_velocity(self.rf2, torch.cat([x, x]), i / n, both).chunk(2)
            x = x + apply_guidance_scale(v_u, v_c, s) / n
        return x

    def distill_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Distillation per sample (B,): the one-step flow against the 2-RF's ODE solution from
        a fresh noise X0 (not the pair cache's)."""
        z = batch.z
        X0 = torch.randn(z.shape, generator=batch.generator).to(device=z.device, dtype=z.dtype)
        target = self._rf2_solution(X0, batch)
        x1 = rectified_flow_sample(self.v, X0, batch.cond, 1)
        if self.lpips is not None and batch.step >= self.lpips_start:
            per_sample = self.lpips(self.decode(x1), self.decode(target)).flatten(1).mean(1)
            return per_sample, {"loss_lpips": per_sample.mean()}
        per_sample = ((x1 - target) ** 2).flatten(1).mean(1)
        return per_sample, {"loss_distill_l2": per_sample.mean()}


@register("instaflow", InstaFlowConfig)
def build(cfg: InstaFlowConfig, teacher: Teacher, steps: int) -> InstaFlow:
    return InstaFlow(cfg, teacher, steps)
