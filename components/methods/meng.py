"""Guided distillation (Meng et al.): a w-conditioned student, then progressive step halving.

Meng, Rombach, Gao, Kingma, Ermon, Ho, Salimans, "On Distillation of Guided Diffusion Models",
CVPR 2023, arXiv:2210.03142 (v3). There is no official code; the losses follow the paper's
Sec. 3 (the two-stage recipe) and the two-step DDIM target of Salimans & Ho 2022, arXiv:2202.00512, Alg. 2).

Stage 1 — guidance distillation (first ``stage1_fraction`` of the iterations). The student
x̂_η(z_t, w) starts as a copy of the teacher with an extra, zero-initialised embedding of the
guidance weight w (diffusers' ``time_cond_proj_dim`` / ``timestep_cond`` path, as LCM uses), so
at initialisation it is exactly the teacher whatever w. With w ~ U[w_min, w_max], t ~ U{0, …, 999}:
    x̂^w_θ(z_t) = (1 + w) x̂_{c,θ}(z_t) − w x̂_θ(z_t)                (weight convention, s = 1 + w)
    L_1 = ω(λ_t) ‖x̂_η(z_t, w) − x̂^w_θ(z_t)‖²,   ω = max(SNR_t, 1)  (truncated SNR weighting)
Stage 2 — progressive distillation, rounds N → N/2 from ``start_steps`` down to
``final_steps`` (e.g. 8 → 4 → 2 → 1). In each round the previous student is frozen as teacher;
the new student's one DDIM step t → t'' must match the teacher's two DDIM steps t → t' → t'':
    x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)
    L_2 = ω(λ_t) ‖x̂_η(z_t, w) − x̃‖²
Data-free deviation: the paper draws z_t from real training images; here z_t noises the
*teacher's own samples* X1 from the teacher pair cache (``cache_teacher``),
``z_t = α_t X1 + σ_t ε``, so no image is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from components.diffusion import apply_guidance_weight, guidance_embedding, predict_x0
from components.generation import GeneratorSpec, ddim_step, trailing_timesteps
from components.methods import Batch, GroupSpec, Teacher, register


@dataclass(frozen=True)
class MengConfig:
    """Defaults: the paper's latent text-to-image range w ∈ [2, 14] [recalled from the paper,
    not checked against released code: none exists]; lr, optimizer and phase split are
    Distillery's choices (documented, not published)."""

    lr: float = 1e-5
    w_min: float = 2.0
    w_max: float = 14.0
    w_dim: int = 256  # size of the w embedding (LCM uses the UNet's time embedding width)
    stage1_fraction: float = 0.5
    start_steps: int = 8  # the teacher's steps in the first halving round
    final_steps: int = 1  # the student's steps at the end (1, 2 or 4)
    sample_guidance_weight: float = 6.5  # w the saved student samples with (s = 7.5)
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.w_min <= self.w_max:
            raise ValueError("need 0 <= w_min <= w_max")
        for n in (self.start_steps, self.final_steps):
            if n < 1 or n & (n - 1):
                raise ValueError("start_steps and final_steps must be powers of two")
        if self.final_steps >= self.start_steps:
            raise ValueError("final_steps must be smaller than start_steps")
        if not 0.0 < self.stage1_fraction < 1.0:
            raise ValueError("stage1_fraction must be in (0, 1)")


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ω(λ_t) = max(α_t² / σ_t², 1) (B, 1, ...)."""
    return (alpha**2 / sigma**2).clamp_min(1.0)


class MengGuidedDistillation:
    """Stage 1 (w-conditioned student) then progressive halving; see the module docstring."""

    needs_pairs = True

    def __init__(self, cfg: MengConfig, teacher: Teacher, steps: int):
        self.cfg = cfg
        self.schedule = teacher.schedule
        self.stage1_end = round(cfg.stage1_fraction * steps)
        self.rounds = int(math.log2(cfg.start_steps // cfg.final_steps))
        self.round_len = max(1, (steps - self.stage1_end) // self.rounds)
        self.spec = GeneratorSpec(kind="ddim", steps=cfg.final_steps,
                                  guidance_weight=cfg.sample_guidance_weight, w_dim=cfg.w_dim)
        clip = cfg.max_grad_norm
        self.groups = (GroupSpec("guidance", max_grad_norm=clip, stop=self.stage1_end),
                       GroupSpec("progressive", max_grad_norm=clip, start=self.stage1_end))
        self.theta = teacher.network.requires_grad_(False)
        self.eta = teacher.network.with_w_embedding(cfg.w_dim).train().requires_grad_(True)
        self.round_teacher = teacher.network.with_w_embedding(cfg.w_dim).requires_grad_(False)

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        return list(self.eta.parameters())

    def make_optimizer(self, group: str) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.eta.parameters(), lr=self.cfg.lr,
                                betas=tuple(self.cfg.adam_betas))

    def student(self) -> torch.nn.Module:
        return self.eta

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.eta, "round_teacher": self.round_teacher}

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        if group == "guidance":
            return self.guidance_loss(batch)
        return self.progressive_loss(batch)

    def _noised_teacher_samples(self, batch: Batch, t: torch.Tensor):
        eps = torch.randn(batch.x1.shape, generator=batch.generator).to(batch.x1.device)
        alpha, sigma = self.schedule.alpha_sigma(t, batch.x1)
        return alpha * batch.x1 + sigma * eps, alpha, sigma

    def _draw_w(self, batch: Batch) -> torch.Tensor:
        u = torch.rand(batch.z.shape[0], generator=batch.generator).to(batch.z.device)
        return self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * u

    def _student_x0(self, net, z_t, t, cond, w) -> torch.Tensor:
        return predict_x0(net, z_t, t, cond, guidance_embedding(w, self.cfg.w_dim))

    def guidance_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Stage 1 per sample (B,): match the teacher's w-guided x0 in one forward pass."""
        B = batch.z.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=batch.generator)
        t = t.to(batch.z.device)
        w = self._draw_w(batch)
        z_t, alpha, sigma = self._noised_teacher_samples(batch, t)
        with torch.no_grad():
            both = predict_x0(self.theta, torch.cat([z_t, z_t]), torch.cat([t, t]),
                              batch.uncond.concat(batch.cond))
            x_u, x_c = both.chunk(2)
            target = apply_guidance_weight(x_u, x_c, w.view(-1, *[1] * (z_t.ndim - 1)))
        x_hat = self._student_x0(self.eta, z_t, t, batch.cond, w)
        per_sample = (truncated_snr_weight(alpha, sigma) * (x_hat - target) ** 2).flatten(1)
        return per_sample.mean(1), {"loss_guidance": per_sample.mean().detach()}

    def round_of(self, step: int) -> int:
        return max(0, min((step - self.stage1_end) // self.round_len, self.rounds - 1))

    @torch.no_grad()
    def _start_round(self, step: int) -> int:
        r = self.round_of(step)
        # at a round's first iteration the previous student becomes the teacher; a function of
        # the step alone (no host read of a device flag), and a resumed run reloads the copy
        if step == self.stage1_end + r * self.round_len:
            self.round_teacher.load_state_dict(self.eta.state_dict())
        return r

    @torch.no_grad()
    def two_step_target(self, z_t, t: int, t_mid: int, t_next: int, cond, w) -> torch.Tensor:
        """x̃: the x0 whose single DDIM step t → t_next lands on the teacher's two steps."""
        net, schedule = self.round_teacher, self.schedule
        z, tt = z_t, t
        for t_to in (t_mid, t_next):
            tb = torch.full((z.shape[0],), tt, dtype=torch.long, device=z.device)
            x0 = self._student_x0(net, z, tb, cond, w)
            alpha, sigma = schedule.alpha_sigma(tb, z)
            z = ddim_step(z, x0, (z - alpha * x0) / sigma, t_to, schedule)
            tt = t_to
        if t_next < 0:
            return z
        tb = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        tn = torch.full_like(tb, t_next)
        a_t, s_t = schedule.alpha_sigma(tb, z)
        a_n, s_n = schedule.alpha_sigma(tn, z)
        return (z - (s_n / s_t) * z_t) / (a_n - (s_n / s_t) * a_t)

    def progressive_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Salimans & Ho Alg. 2 per sample (B,), one random step of the student's N-step grid."""
        r = self._start_round(batch.step)
        n_student = self.cfg.start_steps // 2 ** (r + 1)
        grid = trailing_timesteps(self.schedule.num_timesteps, n_student)
        fine = trailing_timesteps(self.schedule.num_timesteps, 2 * n_student)
        i = int(torch.randint(0, n_student, (), generator=batch.generator))
        t, t_mid = grid[i], fine[2 * i + 1]
        t_next = grid[i + 1] if i + 1 < n_student else -1
        B = batch.z.shape[0]
        tb = torch.full((B,), t, dtype=torch.long, device=batch.z.device)
        w = self._draw_w(batch)
        z_t, alpha, sigma = self._noised_teacher_samples(batch, tb)
        target = self.two_step_target(z_t, t, t_mid, t_next, batch.cond, w)
        x_hat = self._student_x0(self.eta, z_t, tb, batch.cond, w)
        per_sample = (truncated_snr_weight(alpha, sigma) * (x_hat - target) ** 2).flatten(1)
        return per_sample.mean(1), {"loss_progressive": per_sample.mean().detach(),
                                    "pd_student_steps": float(n_student)}


@register("meng", MengConfig)
def build(cfg: MengConfig, teacher: Teacher, steps: int) -> MengGuidedDistillation:
    return MengGuidedDistillation(cfg, teacher, steps)
