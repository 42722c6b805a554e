"""SwiftBrush: one-step text-to-image distillation by variational score distillation.

Nguyen & Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
Distillation", CVPR 2024, arXiv:2312.05239 (v2). Defaults follow the authors' training script
(lr 1e-6 / 1e-3, Adam (0.9, 0.999), LoRA r = 64, α = 108 on to_q/to_v, CFG 4.5, clip 1.0).

Networks: the student f_θ is a full copy of the teacher UNet (or LoRA adapters over a frozen
copy: ``distill.student``). The frozen teacher ε_φ and the LoRA
"fake teacher" ε_ψ share one UNet: adapters disabled give ε_φ, enabled give ε_ψ.

Generator loss (VSD, paper Eq. 5–6, with the code's σ_t² weighting):
    x̂_0 = f_θ(z, y) = (z − σ_T ε_θ(z, T, y)) / α_T,     T = 999
    x_t = α_t x̂_0 + σ_t ε,  t ~ U{20, …, 980}
    g   = σ_t² (ε̂_φ(x_t, t, y) − ε̂_ψ(x_t, t, y))        both with CFG scale s = 4.5
    L_G = ½ ‖x̂_0 − sg[x̂_0 − g]‖²                        so ∂L_G/∂x̂_0 = g
Fake-teacher loss (paper Eq. 7, ᾱ_t-weighted ε-MSE as in the code):
    L_ψ = ‖α_t (ε_ψ(x_t, t, y) − ε)‖²,  x_t from sg[x̂_0],  t ~ U{0, …, 999}
with the whole batch switched to the empty prompt with probability 0.1 (batch-level dropout, as
in the code). One student update, then one LoRA update, per iteration (1 : 1).

Where it converges under CFG. The direction is (1 − s)(ε_φ(∅) − ε_ψ(∅)) + s (ε_φ(c) − ε_ψ(c)):
the LoRA teacher's conditional branch learns the student's class distributions q_c, its
unconditional branch (the 10% empty-prompt batches) their mixture. When the teacher's empty prompt
is the marginal of its prompts, as for a real text-to-image model, q_c = p_c zeroes both terms, so
the fixed point is the teacher's *conditional* distribution whatever s; CFG rescales how fast the
class-separating directions move (and the early overshoot), not where the student ends. Measured
on the analytic Gaussian-mixture teacher at s = 4.5 (``tests/test_swiftbrush_guidance.py``): the
student settles at effective guidance 1.00 ± 0.02 with the teacher's covariance, after swinging
between 0.94 and 1.03 in its first 1,250 iterations. The sharper look of SwiftBrush students on SD
therefore comes from a LoRA teacher that does not track the student exactly, not from the
fixed point.

Checked line by line against the authors' ``train_swiftbrush.py``: teacher and LoRA teacher are
one network; x̂_0 at t = 999 from the scheduler's ᾱ table (the code hard-codes 0.0047 = ᾱ_999);
t ~ U{20, …, 980} for VSD and U{0, …, 999} for the LoRA loss; the same CFG on both; nan_to_num
on g; grad-norm clip 1.0 on each network; separate Adam optimizers, constant lr, no warm-up.
The student's EMA is diffusers' ``EMAModel`` with its defaults (``--use_ema``): decay capped at
0.9999 with the (1 + s)/(10 + s) warm-up (``ema: {kind: warmup}``). The other loop-level settings
of the release (16 per device, 3 epochs over the prompts) are ``distill.loop`` keys.

On a flow teacher (SD3, FLUX; ``x_t = (1 − σ) x0 + σ ε``, the network's u = ε − x0) the losses
stay in ε and go through the protocol's conversions: ε̂ = x_t + (1 − σ) u and x̂0 = x_t − σ u.
Hence g = σ_t² (ε̂_φ − ε̂_ψ) = σ_t² (1 − σ_t) (u_φ − u_ψ), a velocity difference with weight
σ²(1 − σ); the LoRA loss is α² ‖ε̂_ψ − ε‖² = (1 − σ)⁴ ‖u_ψ − (ε − x0)‖², flow matching with weight
(1 − σ)⁴ (ε̂ − ε = (1 − σ)(u − (ε − x0))). The generator at t = 999 is σ = 1: x̂_0 = z − u(z), one
Euler step from pure noise (α = 0, no division). t ~ U{20, …, 980} lands on the teacher's
shifted σ grid, so its shift's weight on high noise carries over. A guidance-distilled teacher
(FLUX.1-dev) is called once per CFG evaluation with ``guidance = s``, its LoRA copy too; the LoRA
teacher learns at the default guidance input 1 (Distillery's choice: no published SwiftBrush
recipe for such teachers exists).

Few-step students (``generator_steps`` N = 2 or 4; Distillery's extension, the paper's
generator is one step): DMD2's N-step generator, x̂_0 above taken at the step k each iteration
trains, its input simulated by the student itself (DMD2 §4.4 backward simulation,
``components.few_step``); the LoRA teacher learns the same step-k samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from components.adapters import add_lora, set_adapters
from components.diffusion import guided_eps, predict_eps
from components.ema import EMAConfig
from components.few_step import check_generator_steps
from components.generation import score_generator
from components.methods import Batch, GroupSpec, Teacher, register, student_x0, trainable


@dataclass(frozen=True)
class SwiftBrushConfig:
    """Published defaults (SwiftBrush README command and ``train_swiftbrush.py``)."""

    student_lr: float = 1e-6
    lora_lr: float = 1e-3
    lora_rank: int = 64
    lora_alpha: float = 108.0
    lora_targets: tuple[str, ...] = ("to_q", "to_v")
    guidance_scale: float = 4.5
    t_min: int = 20
    t_max: int = 980
    generator_t: int = 999
    generator_steps: int = 1  # 2 or 4: a few-step student (components.few_step)
    null_prompt_prob: float = 0.1
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # diffusers EMAModel defaults
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(kind="warmup", decay=0.9999))

    def validate(self) -> None:
        if not 0 <= self.t_min < self.t_max <= 999:
            raise ValueError(f"need 0 <= t_min < t_max <= 999, got {self.t_min}, {self.t_max}")
        if len(self.adam_betas) != 2:
            raise ValueError("adam_betas must have two values")
        check_generator_steps(self.generator_steps, self.generator_t, 999)


class SwiftBrush:
    """VSD with a LoRA fake teacher; see the module docstring for the losses."""

    needs_pairs = False
    student_groups = ("student",)
    phase_starts: tuple[int, ...] = ()

    def __init__(self, cfg: SwiftBrushConfig, teacher: Teacher):
        self.cfg = cfg
        self.ema = cfg.ema
        self.schedule = teacher.schedule
        self.spec = score_generator(cfg.generator_steps, cfg.generator_t, "unit",
                                    teacher.schedule.num_timesteps)
        self.groups = (GroupSpec("student", max_grad_norm=cfg.max_grad_norm),
                       GroupSpec("lora", max_grad_norm=cfg.max_grad_norm))
        self.f_theta = teacher.student_copy()
        # ε_φ with adapters disabled, ε_ψ with them enabled: one network, as in the paper's code
        self.shared = teacher.network
        add_lora(self.shared, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        if group == "student":
            return trainable(self.f_theta)
        # looked up each time: sharding (FSDP2) replaces the parameter objects
        return [p for n, p in self.shared.named_parameters() if "lora_" in n]

    def make_optimizer(self, group: str) -> torch.optim.Optimizer:
        lr = self.cfg.student_lr if group == "student" else self.cfg.lora_lr
        return torch.optim.Adam(self.parameters(group), lr=lr, betas=tuple(self.cfg.adam_betas),
                                eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)

    def begin_phase(self, step: int) -> None:
        pass

    def student(self) -> torch.nn.Module:
        return self.f_theta

    def state_modules(self) -> dict[str, torch.nn.Module]:
        set_adapters(self.shared, True)  # LoRA weights are the trainable ones when saved
        return {"student": self.f_theta, "lora": self.shared}

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        if group == "student":
            return self.generator_loss(batch, scratch)
        return self.fake_teacher_loss(batch, scratch)

    def _guided(self, x_t, t, batch: Batch, adapters: bool) -> torch.Tensor:
        set_adapters(self.shared, adapters)
        return guided_eps(self.shared, x_t, t, batch.cond, batch.uncond, self.cfg.guidance_scale)

    def generator_loss(self, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        """Per-sample VSD surrogate (B,); its gradient w.r.t. x̂_0 is σ_t²(ε̂_φ − ε̂_ψ)."""
        x0_hat = student_x0(self.f_theta, batch, self.spec)
        scratch["x0_hat"] = x0_hat.detach()
        B, gen = x0_hat.shape[0], batch.generator
        t = torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (B,), generator=gen)
        eps = torch.randn(x0_hat.shape, generator=gen).to(x0_hat.device)
        t = t.to(x0_hat.device)
        alpha_t, sigma_t = self.schedule.alpha_sigma(t, x0_hat)
        with torch.no_grad():
            x_t = alpha_t * x0_hat.detach() + sigma_t * eps
            eps_phi = self._guided(x_t, t, batch, adapters=False)
            eps_psi = self._guided(x_t, t, batch, adapters=True)
            g = torch.nan_to_num(sigma_t**2 * (eps_phi - eps_psi))
        target = (x0_hat - g).detach()
        per_sample = 0.5 * ((x0_hat - target) ** 2).flatten(1).mean(1)
        return per_sample, {"loss_vsd": per_sample.mean(), "grad_norm_g": g.norm()}

    def fake_teacher_loss(self, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        """Per-sample ᾱ_t-weighted ε-MSE of the LoRA teacher on the student's samples (B,)."""
        x0_hat, gen = scratch["x0_hat"], batch.generator
        B = x0_hat.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=gen).to(x0_hat.device)
        eps = torch.randn(x0_hat.shape, generator=gen).to(x0_hat.device)
        use_null = torch.rand((), generator=gen).item() < self.cfg.null_prompt_prob
        cond = batch.uncond if use_null else batch.cond
        alpha_t, sigma_t = self.schedule.alpha_sigma(t, x0_hat)
        x_t = alpha_t * x0_hat + sigma_t * eps
        set_adapters(self.shared, True)
        eps_psi = predict_eps(self.shared, x_t, t, cond)
        per_sample = ((alpha_t * (eps_psi - eps)) ** 2).flatten(1).mean(1)
        return per_sample, {"loss_lora": per_sample.mean()}


@register("swiftbrush", SwiftBrushConfig)
def build(cfg: SwiftBrushConfig, teacher: Teacher, steps: int) -> SwiftBrush:
    return SwiftBrush(cfg, teacher)
