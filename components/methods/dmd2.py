"""DMD2: improved distribution matching distillation (data-free stage, GAN term optional).

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024,
arXiv:2405.14867 (v2). Defaults follow the authors' SD1.5 recipe (``experiments/sdv1.5``): AdamW
(0.9, 0.999), weight decay 0.01, lr 1e-5 for both networks with 500 warm-up steps, grad-norm
clip 10, real-score CFG 1.75, fake-score updates 10 per generator update (TTUR), no EMA.

Networks: generator G_θ and fake score μ_fake are full copies of the teacher; the real score
μ_real is the frozen teacher.

Generator (one step): ``x = G_θ(z) = (z − σ_T ε_θ(z, T, y)) / α_T``, T = 999.

Distribution-matching gradient (the paper's DMD gradient with the code's normalisation), t ~ U{20, …, 980}:
    x_t = α_t x + σ_t ε
    x̂_real = x0 of CFG(μ_real(x_t, t, y), s = 1.75),   x̂_fake = x0 of μ_fake(x_t, t, y)  (no CFG)
    g = (x̂_fake − x̂_real) / mean|x − x̂_real|          (per sample, computed in float64)
    L_G = ½ ‖x − sg[x − g]‖²                            so ∂L_G/∂x = g
Fake score (denoising score matching on generator samples, unweighted ε-MSE), t ~ U{0, …, 999}:
    L_fake = ‖ε_fake(x_t, t, y) − ε‖²,   x_t from sg[x]

The GAN term of DMD2's second stage needs real images (VAE latents); Distillery is data-free, so
``gan_weight`` must stay 0 (a non-zero value is refused with an explanation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.diffusion import guided, predict_eps, predict_x0
from components.generation import GeneratorSpec, one_step_x0
from components.methods import Batch, GroupSpec, Teacher, register


@dataclass(frozen=True)
class DMD2Config:
    """Published SD1.5 defaults (DMD2 ``experiments/sdv1.5`` and paper appendix)."""

    generator_lr: float = 1e-5
    fake_lr: float = 1e-5
    real_guidance_scale: float = 1.75
    fake_guidance_scale: float = 1.0  # the code asserts no CFG on the fake score
    gen_update_ratio: int = 10  # fake updates per generator update (TTUR)
    t_min: int = 20
    t_max: int = 980
    generator_t: int = 999
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 500
    max_grad_norm: float = 10.0
    gan_weight: float = 0.0

    def validate(self) -> None:
        if self.fake_guidance_scale != 1.0:
            raise ValueError("DMD2's fake score runs without CFG: fake_guidance_scale must be 1")
        if self.gen_update_ratio < 1:
            raise ValueError("gen_update_ratio must be >= 1")
        if not 0 <= self.t_min < self.t_max <= 999:
            raise ValueError(f"need 0 <= t_min < t_max <= 999, got {self.t_min}, {self.t_max}")
        if self.gan_weight != 0.0:
            raise ValueError(
                "dmd2.gan_weight > 0 needs real image latents for the discriminator, and "
                "Distillery trains without images; keep gan_weight: 0 (DMD2's data-free stage)")


class DMD2:
    """Distribution matching with a full-copy fake score and TTUR; see the module docstring."""

    needs_pairs = False

    def __init__(self, cfg: DMD2Config, teacher: Teacher):
        self.cfg = cfg
        self.schedule = teacher.schedule
        self.spec = GeneratorSpec(t=cfg.generator_t, input_scale="unit")
        # DMD2's code updates the generator first in its iterations, then the fake score
        self.groups = (GroupSpec("generator", every=cfg.gen_update_ratio,
                                 max_grad_norm=cfg.max_grad_norm, warmup=cfg.warmup_steps),
                       GroupSpec("fake", max_grad_norm=cfg.max_grad_norm,
                                 warmup=cfg.warmup_steps))
        self.G_theta = teacher.trainable_copy()
        self.mu_fake = teacher.trainable_copy()
        self.mu_real = teacher.network.requires_grad_(False)

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        return list((self.G_theta if group == "generator" else self.mu_fake).parameters())

    def make_optimizer(self, group: str) -> torch.optim.Optimizer:
        lr = self.cfg.generator_lr if group == "generator" else self.cfg.fake_lr
        return torch.optim.AdamW(self.parameters(group), lr=lr, betas=tuple(self.cfg.adam_betas),
                                 weight_decay=self.cfg.weight_decay)

    def student(self) -> torch.nn.Module:
        return self.G_theta

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.G_theta, "fake": self.mu_fake}

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        if group == "generator":
            return self.distribution_matching_loss(batch, scratch)
        return self.fake_score_loss(batch, scratch)

    def distribution_matching_loss(self, batch: Batch,
                                   scratch: dict) -> tuple[torch.Tensor, dict]:
        """Per-sample ½‖x − sg[x − g]‖² (B,), whose gradient w.r.t. x is the DM direction g."""
        x = one_step_x0(self.G_theta, batch.z, batch.cond, self.spec)
        scratch["x"] = x.detach()
        gen = batch.generator
        t = torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (x.shape[0],), generator=gen)
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        t = t.to(x.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x.detach(), eps, t)
            x_real = guided(self.mu_real, x_t, t, batch.cond, batch.uncond,
                            self.cfg.real_guidance_scale, "x0").double()
            x_fake = predict_x0(self.mu_fake, x_t, t, batch.cond).double()
            x64 = x.detach().double()
            norm = (x64 - x_real).abs().flatten(1).mean(1).clamp_min(1e-12)
            g = ((x_fake - x_real) / norm.view(-1, *[1] * (x.ndim - 1))).float()
            g = torch.nan_to_num(g)
        per_sample = 0.5 * ((x - (x - g).detach()) ** 2).flatten(1).mean(1)
        return per_sample, {"loss_dm": per_sample.mean().item(), "grad_norm_g": g.norm().item()}

    def fake_score_loss(self, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        """Unweighted ε-MSE of the fake score on the generator's current samples (B,)."""
        x = scratch.get("x")
        if x is None:  # a fake-only iteration: sample the generator without gradients
            with torch.no_grad():
                x = one_step_x0(self.G_theta, batch.z, batch.cond, self.spec)
        gen = batch.generator
        t = torch.randint(0, self.schedule.num_timesteps, (x.shape[0],), generator=gen)
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        t = t.to(x.device)
        x_t = self.schedule.add_noise(x, eps, t)
        eps_fake = predict_eps(self.mu_fake, x_t, t, batch.cond)
        per_sample = ((eps_fake - eps) ** 2).flatten(1).mean(1)
        return per_sample, {"loss_fake": per_sample.mean().item()}


@register("dmd2", DMD2Config)
def build(cfg: DMD2Config, teacher: Teacher, steps: int) -> DMD2:
    return DMD2(cfg, teacher)
