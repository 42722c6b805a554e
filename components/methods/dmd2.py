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

Optional GAN term (DMD2's second stage), only when real image latents are supplied
(``real_latents``: a safetensors file with ``latents`` (N, C, h, w), VAE latents already scaled
by the VAE's scaling factor). A head on the fake score's bottleneck features (the UNet's mid
block) classifies noised real vs generated latents (diffusion-GAN, t ~ U{0, …, 999}), with
non-saturating losses:
    L_G += λ_G softplus(−D(x_t^fake)),   L_fake += λ_D [softplus(D(x_t^fake)) + softplus(−D(x_t^real))]
λ_G = ``gan_weight`` (1e-3 for SD1.5's stage 2), λ_D = ``gan_head_weight`` (1e-2). The head is a
small conv stack with global average pooling (size-agnostic), trained with the fake score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    gan_weight: float = 0.0  # 0: data-free stage 1; 1e-3 in the paper's stage 2
    gan_head_weight: float = 1e-2
    real_latents: str | None = None  # safetensors file {"latents": (N, C, h, w)}, scaled

    def validate(self) -> None:
        if self.fake_guidance_scale != 1.0:
            raise ValueError("DMD2's fake score runs without CFG: fake_guidance_scale must be 1")
        if self.gen_update_ratio < 1:
            raise ValueError("gen_update_ratio must be >= 1")
        if not 0 <= self.t_min < self.t_max <= 999:
            raise ValueError(f"need 0 <= t_min < t_max <= 999, got {self.t_min}, {self.t_max}")
        if self.gan_weight < 0 or self.gan_head_weight < 0:
            raise ValueError("gan_weight and gan_head_weight must be >= 0")
        if self.gan_weight > 0 and not self.real_latents:
            raise ValueError(
                "dmd2.gan_weight > 0 needs real image latents for the discriminator: set "
                "dmd2.real_latents to a safetensors file with 'latents' (N, C, h, w) (VAE "
                "latents of real images), or keep gan_weight: 0 (DMD2's data-free stage)")


class BottleneckHead(torch.nn.Module):
    """D: the fake score's mid-block features (B, C, h, w) -> one logit per sample (B,)."""

    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 1
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.GroupNorm(groups, channels),
            torch.nn.SiLU(), torch.nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).mean(dim=(1, 2, 3))


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
        self.head, self.real = None, None
        if cfg.gan_weight > 0:
            self._init_gan(cfg)

    def _init_gan(self, cfg: DMD2Config) -> None:
        from safetensors.torch import load_file

        mid = getattr(getattr(self.mu_fake, "unet", None), "mid_block", None)
        if mid is None:
            raise ValueError("DMD2's GAN head reads a diffusers UNet's mid block; this teacher "
                             "network has none (set gan_weight: 0)")
        path = Path(cfg.real_latents)
        if not path.is_file():
            raise FileNotFoundError(f"dmd2.real_latents: {path} not found; give a safetensors "
                                    "file with 'latents' (N, C, h, w)")
        self.real = load_file(str(path))["latents"].float()
        self._features: list[torch.Tensor] = []
        mid.register_forward_hook(self._keep_features)
        channels = self.mu_fake.unet.config.block_out_channels[-1]
        device = next(self.mu_fake.parameters()).device
        self.head = BottleneckHead(channels).to(device)

    def _keep_features(self, _module, _inputs, out: torch.Tensor) -> None:
        self._features[:] = [out]  # only the latest pass's bottleneck

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        if group == "generator":
            return list(self.G_theta.parameters())
        head = list(self.head.parameters()) if self.head is not None else []
        return list(self.mu_fake.parameters()) + head

    def make_optimizer(self, group: str) -> torch.optim.Optimizer:
        lr = self.cfg.generator_lr if group == "generator" else self.cfg.fake_lr
        return torch.optim.AdamW(self.parameters(group), lr=lr, betas=tuple(self.cfg.adam_betas),
                                 weight_decay=self.cfg.weight_decay)

    def student(self) -> torch.nn.Module:
        return self.G_theta

    def state_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"generator": self.G_theta, "fake": self.mu_fake}
        if self.head is not None:
            modules["gan_head"] = self.head
        return modules

    def _logits(self, x0: torch.Tensor, batch: Batch) -> torch.Tensor:
        """D(x_t) for latents x0 noised at t ~ U{0, …, 999} (diffusion-GAN), per sample (B,)."""
        gen = batch.generator
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        x_t = self.schedule.add_noise(x0, eps, t.to(x0.device))
        self.mu_fake(x_t, t.to(x0.device), batch.cond)
        return self.head(self._features[-1].float())

    def _real_latents(self, batch: Batch) -> torch.Tensor:
        idx = torch.randint(0, self.real.shape[0], (batch.z.shape[0],), generator=batch.generator)
        return self.real[idx].to(batch.z.device)

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
        metrics = {"loss_dm": per_sample.mean().detach(), "grad_norm_g": g.norm().detach()}
        if self.head is not None:  # gradients reach x through the frozen fake score and head
            self.mu_fake.requires_grad_(False)
            self.head.requires_grad_(False)
            gan = torch.nn.functional.softplus(-self._logits(x, batch))
            self.mu_fake.requires_grad_(True)
            self.head.requires_grad_(True)
            per_sample = per_sample + self.cfg.gan_weight * gan
            metrics["loss_gan_g"] = gan.mean().detach()
        return per_sample, metrics

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
        metrics = {"loss_fake": per_sample.mean().detach()}
        if self.head is not None:
            softplus = torch.nn.functional.softplus
            d_loss = (softplus(self._logits(x.detach(), batch))
                      + softplus(-self._logits(self._real_latents(batch), batch)))
            per_sample = per_sample + self.cfg.gan_head_weight * d_loss
            metrics["loss_gan_d"] = d_loss.mean().detach()
        return per_sample, metrics


@register("dmd2", DMD2Config)
def build(cfg: DMD2Config, teacher: Teacher, steps: int) -> DMD2:
    return DMD2(cfg, teacher)
