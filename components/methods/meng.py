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
``final_steps`` (e.g. 64 → 32 → … → 1). Each round is a fresh run (Salimans & Ho, Alg. 2): the
previous round's EMA is frozen as its teacher and initialises its student, with a fresh
optimizer state and a fresh EMA (the loop's phases, ``components.methods.Method``). For each
sample a step index i of the student's N-step grid is drawn (Alg. 2 draws t per example), and the
new student's one DDIM step t → t'' must match the teacher's two DDIM steps t → t' → t'':
    x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)
    L_2 = ω(λ_t) ‖x̂_η(z_t, w) − x̃‖²
Data-free deviation: the paper draws z_t from real training images; here z_t noises the
*teacher's own samples* X1 from the teacher pair cache (``cache_teacher``),
``z_t = α_t X1 + σ_t ε``, so no image is needed. Each X1 is the teacher's sample at its own CFG
scale s_i = 1 + w_i, w_i ~ U[w_min, w_max] (``cache.pairs.guidance_range``), and a sample trains
the student at that w_i: the student learns its w-dependence on the noised w-guided distribution
that its own sampler visits at w. Noising samples of one fixed scale instead leaves the student
right near that scale only (on the analytic problem: effective guidance 1.16 for the teacher's
0.97 at w = 0, 3.1 for 2.9 at w = 2, with pairs at s = 2). A cache without per-pair scales falls
back to w ~ U[w_min, w_max].

Why ``start_steps`` is 64: progressive distillation reproduces its first teacher's N-step DDIM
sampler, halving after halving, so the one-step student can at best reach the stage-1 model's
``start_steps``-step DDIM distribution. At 8 steps DDIM is visibly worse than the converged
sampler (on the analytic problem 4 steps give a variance of 0.10 where the data has 0.30, 64 give
0.275); 64 steps are within a few percent of 50-step samplers on SD, at the cost of six rounds
instead of three.

On a flow teacher (``x_t = (1 − σ) x0 + σ ε``, u = ε − x0): stage 1 matches x̂0 = x_t − σ u, and
since CFG is linear the w-guided x0 is x_t − σ u^w with u^w = (1 + w) u_c − w u; ω = max(α²/σ², 1)
with α = 1 − σ. The DDIM step of stage 2 is the flow's Euler step: α' x̂0 + σ' ε̂ = x_t + (σ' − σ) u.
The w input: SD3 and FLUX.1-schnell get a zero-initialised w projection into the pooled text
embedding. A guidance-distilled teacher (FLUX.1-dev) already *is* a stage-1 model: its
guidance input is the w input (s = 1 + w) and it has no true CFG to distil, so stage 1 means
nothing more: ``stage1_fraction: 0`` is required there (any other value fails at build,
naming why) and the rounds halve the teacher's own guided sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from components.diffusion import (
    apply_guidance_weight,
    guidance_scale_to_weight,
    guidance_weight_to_scale,
    predict_x0,
    w_conditioning,
)
from components.ema import EMAConfig
from components.generation import GeneratorSpec, trailing_timesteps
from components.methods import Batch, GroupSpec, Teacher, register


@dataclass(frozen=True)
class MengConfig:
    """Defaults: the paper's latent text-to-image range w ∈ [2, 14] [recalled from the paper,
    not checked against released code: none exists]; lr, optimizer, phase split and EMA (the
    paper's 0.9999 with diffusers' warm-up, restarted every round) are Distillery's choices
    (documented, not published)."""

    lr: float = 1e-5
    w_min: float = 2.0
    w_max: float = 14.0
    w_dim: int = 256  # size of the w embedding (LCM uses the UNet's time embedding width)
    stage1_fraction: float = 0.5
    start_steps: int = 64  # the stage-1 model's DDIM steps the first round halves (see above)
    final_steps: int = 1  # the student's steps at the end (1, 2 or 4)
    sample_guidance_weight: float = 6.5  # w the saved student samples with (s = 7.5)
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(kind="warmup", decay=0.9999))

    def pair_guidance_range(self) -> tuple[float, float]:
        """The CFG scales the pair cache samples its pairs over, one per pair: s = 1 + w."""
        return (guidance_weight_to_scale(self.w_min), guidance_weight_to_scale(self.w_max))

    def validate(self) -> None:
        if not 0.0 <= self.w_min <= self.w_max:
            raise ValueError("need 0 <= w_min <= w_max")
        for n in (self.start_steps, self.final_steps):
            if n < 1 or n & (n - 1):
                raise ValueError("start_steps and final_steps must be powers of two")
        if self.final_steps >= self.start_steps:
            raise ValueError("final_steps must be smaller than start_steps")
        if not 0.0 <= self.stage1_fraction < 1.0:
            raise ValueError("stage1_fraction must be in [0, 1) (0 only for a teacher that is "
                             "guidance-distilled already)")


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ω(λ_t) = max(α_t² / σ_t², 1) (B, 1, ...)."""
    return (alpha**2 / sigma**2).clamp_min(1.0)


def stage1_problem(cfg: MengConfig, embedded_guidance: bool) -> str | None:
    """Stage 1 distils CFG into a w input; a guidance-distilled teacher (FLUX.1-dev) has one.
    Why ``cfg`` does not fit a teacher with or without that input, or None."""
    if embedded_guidance and cfg.stage1_fraction > 0:
        return ("meng.stage1_fraction must be 0 for this teacher: it is guidance-distilled "
                "already (its guidance input is stage 1's w input, s = 1 + w, and it has no true "
                "CFG to distil), so the run is progressive distillation of its own guided "
                "sampler")
    if not embedded_guidance and cfg.stage1_fraction == 0:
        return ("meng.stage1_fraction: 0 skips guidance distillation, which only a "
                "guidance-distilled teacher (FLUX.1-dev) may; set it in (0, 1)")
    return None


def _check_stage1(cfg: MengConfig, network: torch.nn.Module) -> None:
    if why := stage1_problem(cfg, getattr(network, "embedded_guidance", False)):
        raise ValueError(why)


class MengGuidedDistillation:
    """Stage 1 (w-conditioned student) then progressive halving; see the module docstring."""

    needs_pairs = True
    lora_unsupported = (
        "Meng et al.'s student adds a guidance-weight embedding layer the teacher lacks "
        "(diffusers' time_cond_proj_dim), which a LoRA on the teacher cannot carry")
    student_groups = ("guidance", "progressive")

    @staticmethod
    def teacher_unsupported(cfg: MengConfig, traits: dict) -> str | None:
        """The config-load check of ``_check_stage1`` from the teacher folder's configs."""
        return stage1_problem(cfg, traits["embedded_guidance"])

    def __init__(self, cfg: MengConfig, teacher: Teacher, steps: int):
        _check_stage1(cfg, teacher.network)
        self.cfg = cfg
        self.ema = cfg.ema
        self.schedule = teacher.schedule
        self.stage1_end = round(cfg.stage1_fraction * steps)
        self.rounds = int(math.log2(cfg.start_steps // cfg.final_steps))
        self.round_len = max(1, (steps - self.stage1_end) // self.rounds)
        self.phase_starts = tuple(self.stage1_end + r * self.round_len
                                  for r in range(self.rounds))
        self.spec = GeneratorSpec(kind="ddim", steps=cfg.final_steps,
                                  guidance_weight=cfg.sample_guidance_weight, w_dim=cfg.w_dim)
        clip = cfg.max_grad_norm
        self.groups = (GroupSpec("guidance", max_grad_norm=clip, stop=self.stage1_end,
                                 optimizer="student"),
                       GroupSpec("progressive", max_grad_norm=clip, start=self.stage1_end,
                                 optimizer="student"))
        self.theta = teacher.network.requires_grad_(False)
        # the w-conditioned copies are built where the teacher lives (its device and dtype)
        self.eta = teacher.network.with_w_embedding(cfg.w_dim).train().requires_grad_(True)
        self.round_teacher = teacher.network.with_w_embedding(cfg.w_dim).requires_grad_(False)

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        return list(self.eta.parameters())

    def make_optimizer(self, name: str) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.eta.parameters(), lr=self.cfg.lr,
                                betas=tuple(self.cfg.adam_betas))

    @torch.no_grad()
    def begin_phase(self, step: int) -> None:
        """A halving round begins: the student (holding the last round's EMA) is its teacher."""
        self.round_teacher.load_state_dict(self.eta.state_dict())

    def student(self) -> torch.nn.Module:
        return self.eta

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.eta, "round_teacher": self.round_teacher}

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        if group == "guidance":
            return self.guidance_loss(batch)
        return self.progressive_loss(batch)

    def _noised_teacher_samples(self, batch: Batch, t: torch.Tensor):
        x1 = batch.x1
        eps = torch.randn(x1.shape, generator=batch.generator).to(device=x1.device, dtype=x1.dtype)
        alpha, sigma = self.schedule.alpha_sigma(t, batch.x1)
        return alpha * batch.x1 + sigma * eps, alpha, sigma

    def _draw_w(self, batch: Batch) -> torch.Tensor:
        """w per sample (B,): each pair's own, w = s − 1, else uniform on [w_min, w_max]."""
        u = torch.rand(batch.z.shape[0], generator=batch.generator).to(batch.z.device)
        if batch.x1_guidance is not None:
            return guidance_scale_to_weight(batch.x1_guidance.to(u))
        return self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * u

    def _student_x0(self, net, z_t, t, cond, w) -> torch.Tensor:
        return predict_x0(net, z_t, t, cond, **w_conditioning(net, w, self.cfg.w_dim))

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
        return per_sample.mean(1), {"loss_guidance": per_sample.mean()}

    def round_of(self, step: int) -> int:
        return max(0, min((step - self.stage1_end) // self.round_len, self.rounds - 1))

    def _ddim_to(self, z, x0, eps, t_to: torch.Tensor) -> torch.Tensor:
        """Per-sample deterministic DDIM step to ``t_to`` (B,); −1 is the clean end (x0)."""
        alpha, sigma = self.schedule.alpha_sigma(t_to.clamp_min(0), z)
        clean = (t_to < 0).view(-1, *[1] * (z.ndim - 1))
        return torch.where(clean, x0, alpha * x0 + sigma * eps)

    @torch.no_grad()
    def two_step_target(self, z_t, t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor,
                        cond, w) -> torch.Tensor:
        """x̃ (B, ...): the x0 whose single DDIM step t → t_next lands on the round teacher's two
        steps t → t_mid → t_next (per-sample timesteps (B,); t_next = −1: the clean end)."""
        z, tt = z_t, t
        for t_to in (t_mid, t_next):
            x0 = self._student_x0(self.round_teacher, z, tt, cond, w)
            alpha, sigma = self.schedule.alpha_sigma(tt, z)
            z = self._ddim_to(z, x0, (z - alpha * x0) / sigma, t_to)
            tt = t_to
        a_t, s_t = self.schedule.alpha_sigma(t, z)
        a_n, s_n = self.schedule.alpha_sigma(t_next.clamp_min(0), z)
        x_tilde = (z - (s_n / s_t) * z_t) / (a_n - (s_n / s_t) * a_t)
        return torch.where((t_next < 0).view(-1, *[1] * (z.ndim - 1)), z, x_tilde)

    def _draw_grid_steps(self, n_student: int, batch: Batch):
        """Per sample: a step t of the student's N-step grid, the midpoint t' of the 2N-step
        grid below it and the next step t'' (−1 after the last), each (B,)."""
        T = self.schedule.num_timesteps
        grid = trailing_timesteps(T, n_student)
        fine = trailing_timesteps(T, 2 * n_student)
        i = torch.randint(0, n_student, (batch.z.shape[0],), generator=batch.generator)
        t = torch.tensor(grid)[i]
        t_mid = torch.tensor(fine[1::2])[i]
        t_next = torch.tensor([*grid[1:], -1])[i]
        return (x.to(batch.z.device) for x in (t, t_mid, t_next))

    def progressive_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Salimans & Ho Alg. 2 per sample (B,), each sample at its own step of the N-step grid."""
        n_student = self.cfg.start_steps // 2 ** (self.round_of(batch.step) + 1)
        t, t_mid, t_next = self._draw_grid_steps(n_student, batch)
        w = self._draw_w(batch)
        z_t, alpha, sigma = self._noised_teacher_samples(batch, t)
        target = self.two_step_target(z_t, t, t_mid, t_next, batch.cond, w)
        x_hat = self._student_x0(self.eta, z_t, t, batch.cond, w)
        per_sample = (truncated_snr_weight(alpha, sigma) * (x_hat - target) ** 2).flatten(1)
        return per_sample.mean(1), {"loss_progressive": per_sample.mean(),
                                    "pd_student_steps": float(n_student)}


@register("meng", MengConfig)
def build(cfg: MengConfig, teacher: Teacher, steps: int) -> MengGuidedDistillation:
    return MengGuidedDistillation(cfg, teacher, steps)
