"""SiD-LSG: score identity distillation with long and short classifier-free guidance.

Zhou, Wang, Zheng, Huang, "Guided Score identity Distillation for Data-Free One-Step
Text-to-Image Generation", ICLR 2025, arXiv:2406.01561 (v3). Defaults follow the authors' SD1.5
recipe (``run_sid.sh``, ``sid_train.py``): α = 1, Adam with β1 = 0, lr 1e-6 for both networks, no
warm-up, global batch 512, fp32, an EDM-style EMA of G with a 50 kimg half-life and ramp-up 0.05
(``--ema 0.05``, in Mimg). κ = 1.5 everywhere is the README's best-FID setting (8.15); the example
command in ``run_sid.sh`` uses κ = 2.0.

Networks: the generator G_θ and the fake score f_ψ are full copies of the teacher f_φ (G_θ can
be LoRA adapters over a frozen copy instead: ``distill.student``).
Generator (one step at t_init = 625, input scaled by σ):
    G_θ(z, y) = (σ_init z − σ_init ε_θ(σ_init z, t_init, y)) / α_init

The four guidance scales of the paper map to config keys by where they act:
    κ1 = ``fake_train_guidance``: CFG on f_ψ inside its own training loss,
    κ2 = κ3 = ``fake_eval_guidance``: CFG on f_ψ when evaluated in the generator loss,
    κ4 = ``real_eval_guidance``: CFG on the teacher f_φ in the generator loss.
CFG is ``u + κ (c − u)``; with κ1 ≠ 1 or κ2 ≠ 1 each sample's prompt is replaced by the empty
prompt with probability 0.1 in the fake-score step *before* G is called, as the official loop
does, so those samples are G(z, ∅) and f_ψ's unconditional branch learns G's own empty-prompt
outputs. The generator step draws its own batch of prompts and noise (the official loop takes a
second prompt batch), without dropout.

Fake-score loss (first in each iteration), t ~ U{20, …, 979}, x_g = sg[G_θ(z, y')] with y' the
dropped-out prompts:
    L_ψ = ‖CFG(ε_ψ(x_t, t, ·), κ1) − ε‖²      (summed over dimensions)
Generator loss (the score-identity loss with α; second), fresh prompts, z, ε, t ~ U{20, …, 979}:
    y_fake = x0 of CFG(f_ψ(x_t), κ2),  y_real = x0 of CFG(f_φ(x_t), κ4),  ω = 1 / mean|x_g − y_real|
    L_θ = ω (y_real − y_fake)ᵀ [(y_real − x_g) − α (y_real − y_fake)]
No stop-gradient: L_θ back-propagates through f_φ and f_ψ (their weights frozen in this step)
into x_g and θ. That is where SiD's memory goes; the loop's policy (``distill.policy``:
activation checkpointing, bf16) is what reduces it.

On a flow teacher (``x_t = (1 − σ) x0 + σ ε``, u = ε − x0) the score-identity loss is in x0:
y = x_t − σ u, so y_real − y_fake = σ (u_fake − u_real) and L_θ reads as the same inner product
of velocity differences scaled by σ (ω normalises the scale away). The fake-score loss is
‖ε̂_ψ − ε‖² = (1 − σ)² ‖u_ψ − (ε − x0)‖², flow matching with weight (1 − σ)². The generator's
t_init = 625 is σ_init = shift(0.626) (0.83 at SD3's shift 3) and its input σ_init z, the noisy
input of x0 = 0, as in the VP form. CFG with κ on a guidance-distilled teacher is its guidance
input κ (one call).

Few-step students (``generator_steps`` N = 2 or 4; Distillery's extension, the paper's
generator is one step): DMD2's N-step generator from pure noise on [999, 749, 499, 249] (N = 4)
or [999, 499] (``t_init`` and the σ-scaled input belong to the one-step generator), x_g taken
at the step k each iteration trains, its input simulated by G_θ itself (DMD2 §4.4 backward
simulation, ``components.few_step``), in both the fake-score and the generator step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from components.diffusion import guided
from components.ema import EMAConfig
from components.few_step import check_generator_steps
from components.generation import score_generator
from components.methods import Batch, GroupSpec, Teacher, register, student_x0, trainable


@dataclass(frozen=True)
class SiDLSGConfig:
    """Published SD1.5 defaults (``run_sid.sh``, ``sid_train.py``)."""

    generator_lr: float = 1e-6
    fake_lr: float = 1e-6
    fake_train_guidance: float = 1.5  # κ1
    fake_eval_guidance: float = 1.5  # κ2 = κ3
    real_eval_guidance: float = 1.5  # κ4
    alpha: float = 1.0
    null_prompt_prob: float = 0.1  # per sample, only when κ1 or κ2 differs from 1
    t_init: int = 625  # the one-step generator's; a few-step one starts at 999
    generator_steps: int = 1  # 2 or 4: a few-step student (components.few_step)
    t_min: int = 20
    t_max: int = 979
    adam_betas: tuple[float, ...] = (0.0, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None  # the fp32 recipe does not clip
    # --ema 0.05 (Mimg) and the EDM ramp-up ratio 0.05 of sid_train.py
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(kind="halflife", halflife_kimg=50.0,
                                                             rampup=0.05))

    def validate(self) -> None:
        if not 0 <= self.t_min < self.t_max <= 999 or not 0 < self.t_init <= 999:
            raise ValueError("need 0 <= t_min < t_max <= 999 and 0 < t_init <= 999")
        if len(self.adam_betas) != 2:
            raise ValueError("adam_betas must have two values")
        check_generator_steps(self.generator_steps, self.t_init, 625, "t_init")


class SiDLSG:
    """Score identity distillation with LSG; see the module docstring for the losses."""

    needs_pairs = False
    student_groups = ("generator",)
    phase_starts: tuple[int, ...] = ()

    def __init__(self, cfg: SiDLSGConfig, teacher: Teacher):
        self.cfg = cfg
        self.ema = cfg.ema
        self.schedule = teacher.schedule
        self.spec = score_generator(cfg.generator_steps, cfg.t_init, "sigma",
                                    teacher.schedule.num_timesteps)
        clip = cfg.max_grad_norm
        self.groups = (GroupSpec("fake", max_grad_norm=clip),
                       GroupSpec("generator", max_grad_norm=clip, fresh_batch=True))
        self.G_theta = teacher.student_copy()
        self.f_psi = teacher.trainable_copy()
        self.f_phi = teacher.network.requires_grad_(False)

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        return trainable(self.G_theta) if group == "generator" else list(self.f_psi.parameters())

    def make_optimizer(self, group: str) -> torch.optim.Optimizer:
        lr = self.cfg.generator_lr if group == "generator" else self.cfg.fake_lr
        return torch.optim.Adam(self.parameters(group), lr=lr, betas=tuple(self.cfg.adam_betas),
                                eps=self.cfg.adam_eps)

    def begin_phase(self, step: int) -> None:
        pass

    def student(self) -> torch.nn.Module:
        return self.G_theta

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.G_theta, "fake": self.f_psi}

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        if group == "fake":
            return self.fake_score_loss(batch)
        return self.generator_loss(batch)

    def _draw_t_eps(self, x: torch.Tensor, gen: torch.Generator):
        t = torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (x.shape[0],), generator=gen)
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        return t.to(x.device), eps

    def fake_score_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The κ1-guided fake ε regressed on the noise, per sample (B,)."""
        cfg, gen = self.cfg, batch.generator
        cond = batch.cond
        if cfg.fake_train_guidance != 1.0 or cfg.fake_eval_guidance != 1.0:
            drop = torch.rand(batch.z.shape[0], generator=gen) < cfg.null_prompt_prob
            cond = cond.where(drop.to(batch.z.device), batch.uncond)
        with torch.no_grad():
            x_g = student_x0(self.G_theta, batch, self.spec, cond)
        t, eps = self._draw_t_eps(x_g, gen)
        x_t = self.schedule.add_noise(x_g, eps, t)
        self.f_psi.requires_grad_(True)
        eps_psi = guided(self.f_psi, x_t, t, cond, batch.uncond, cfg.fake_train_guidance)
        per_sample = ((eps_psi - eps) ** 2).flatten(1).sum(1)
        return per_sample, {"loss_fake": per_sample.mean()}

    def _frozen_x0(self, net, x_t, t, batch: Batch, scale: float) -> torch.Tensor:
        """x0 of a CFG-guided frozen network, differentiable w.r.t. ``x_t``."""
        return guided(net, x_t, t, batch.cond, batch.uncond, scale, "x0")

    def generator_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The score-identity loss, per sample (B,), with gradients through f_φ and f_ψ; the
        batch is the generator step's own (``fresh_batch``)."""
        cfg, gen = self.cfg, batch.generator
        x_g = student_x0(self.G_theta, batch, self.spec)
        t, eps = self._draw_t_eps(x_g, gen)
        x_t = self.schedule.add_noise(x_g, eps, t)
        self.f_psi.requires_grad_(False)  # frozen in this step; gradients flow through it
        y_fake = self._frozen_x0(self.f_psi, x_t, t, batch, cfg.fake_eval_guidance)
        y_real = self._frozen_x0(self.f_phi, x_t, t, batch, cfg.real_eval_guidance)
        with torch.no_grad():
            omega = 1.0 / (x_g - y_real).abs().flatten(1).mean(1).clamp_min(1e-5)
        diff = y_real - y_fake
        inner = (diff * ((y_real - x_g) - cfg.alpha * diff)).flatten(1).sum(1)
        per_sample = omega * inner
        return per_sample, {"loss_sid": per_sample.mean()}


@register("sid_lsg", SiDLSGConfig)
def build(cfg: SiDLSGConfig, teacher: Teacher, steps: int) -> SiDLSG:
    return SiDLSG(cfg, teacher)
