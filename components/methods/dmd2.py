"""DMD2: improved distribution matching distillation (data-free stage, GAN term optional).

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024,
arXiv:2405.14867 (v2). Defaults follow the authors' SD1.5 recipe (``experiments/sdv1.5``): AdamW
(0.9, 0.999), weight decay 0.01, lr 1e-5 for both networks with 500 warm-up steps, grad-norm
clip 10, real-score CFG 1.75, fake-score updates 10 per generator update (TTUR), no EMA
(``ema: {kind: none}``: the saved generator is the raw weights).

Networks: generator G_θ and fake score μ_fake are full copies of the teacher (G_θ can be LoRA
adapters over a frozen copy instead: ``distill.student``); the real score μ_real is the frozen
teacher.

Generator (one step): ``x = G_θ(z) = (z − σ_T ε_θ(z, T, y)) / α_T``, T = 999. With
``generator_steps`` N = 2 or 4, the paper's multi-step generator (§4.4) on [999, 749, 499, 249]
(N = 4) or [999, 499]: x is its x̂0 at the step k each iteration trains, the input produced by
backward simulation (the generator itself, without gradients, through steps 0 … k − 1 from
pure noise; ``components.few_step``), and the fake score trains on those same samples.

Distribution-matching gradient (the paper's DMD gradient with the code's normalisation), t ~ U{20, …, 980}:
    x_t = α_t x + σ_t ε
    x̂_real = x0 of CFG(μ_real(x_t, t, y), s = 1.75),   x̂_fake = x0 of μ_fake(x_t, t, y)  (no CFG)
    g = (x̂_fake − x̂_real) / mean|x − x̂_real|          (per sample)
    L_G = ½ ‖x − sg[x − g]‖²                            so ∂L_G/∂x = g
The x̂'s are computed by the networks in their own precision (fp32, or bf16 under the bf16 policy)
and cast to float64 for the difference, the normalisation and the division, as the official code
casts its predictions (``.double()``) before forming the gradient; g goes back to the latent dtype.
Fake score (denoising score matching on generator samples, unweighted ε-MSE), t ~ U{0, …, 999}:
    L_fake = ‖ε_fake(x_t, t, y) − ε‖²,   x_t from sg[x]

Optional GAN term (DMD2's second stage), only when real image latents are supplied
(``real_latents``: a file of ``components/real_latents.py``'s format: VAE latents scaled by the
VAE's scaling factor, each with the text conditioning of its own caption; written by
``python -m pipeline.real_latents``). A head D on the fake score's bottleneck features (the
UNet's mid block) classifies noised real vs generated latents (diffusion-GAN, t ~ U{0, …, 999}),
each run through the fake score with its own caption (generated: the batch's prompts, real: the
image's caption, as the official code does; a shared prompt would let D tell them apart by text
alignment), with non-saturating losses:
    L_G += λ_G softplus(−D(x_t^fake)),   L_fake += λ_D [softplus(D(x_t^fake)) + softplus(−D(x_t^real))]
λ_G = ``gan_weight``, λ_D = ``gan_head_weight``; D (``DiscriminatorHead``) trains with the fake
score.

Two stages (paper appendix, tianweiy/DMD2#30; ``experiments/sdv1.5/*_resume*.sh``): stage 1 is
data-free (``gan_weight: 0``, lr 1e-5); stage 2 resumes its generator and fake score with
``init_from`` (a stage-1 checkpoint folder; optimizer state and step start afresh, D at random
unless the checkpoint holds one) and adds the GAN term at SD1.5's published values ``gan_weight: 1e-3``,
``gan_head_weight: 1e-2``, ``generator_lr: 5e-7``, ``fake_lr: 5e-7`` (SDXL: ``gan_weight: 5e-3``).

On a flow teacher (``x_t = (1 − σ) x0 + σ ε``, u = ε − x0): x̂ = x_t − σ u, so the DM direction is
g = σ (u_real − u_fake) / mean|x − x̂_real|, the velocity difference (normalised per sample);
the fake score's ε-MSE is (1 − σ)² ‖u_fake − (ε − x0)‖², flow matching with weight (1 − σ)². The
generator at t = 999 is σ = 1: x = z − u(z) (α = 0, no division). The real score's CFG on a
guidance-distilled teacher (FLUX.1-dev) is its guidance input s = 1.75 (one call); the GAN head
reads a UNet's mid block, so ``gan_weight > 0`` fails at build on a transformer teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.diffusion import guided, predict_eps, predict_x0
from components.ema import EMAConfig
from components.few_step import check_generator_steps
from components.generation import score_generator
from components.methods import Batch, GroupSpec, Teacher, register, student_x0, trainable
from components.real_latents import RealLatents, load_real_latents
from components.teacher import TextConditioning


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
    generator_steps: int = 1  # 4: the paper's four-step generator (components.few_step)
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 500
    max_grad_norm: float = 10.0
    gan_weight: float = 0.0  # 0: data-free stage 1; 1e-3 in the paper's stage 2
    gan_head_weight: float = 1e-2
    real_latents: str | None = None  # components/real_latents.py file: latents + captions
    init_from: str | None = None  # stage 2: a stage-1 checkpoint folder (step-N or its parent)
    # the official code keeps no EMA
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(kind="none"))

    def validate(self) -> None:
        if self.fake_guidance_scale != 1.0:
            raise ValueError("DMD2's fake score runs without CFG: fake_guidance_scale must be 1")
        if self.gen_update_ratio < 1:
            raise ValueError("gen_update_ratio must be >= 1")
        if not 0 <= self.t_min < self.t_max <= 999:
            raise ValueError(f"need 0 <= t_min < t_max <= 999, got {self.t_min}, {self.t_max}")
        check_generator_steps(self.generator_steps, self.generator_t, 999)
        if self.gan_weight < 0 or self.gan_head_weight < 0:
            raise ValueError("gan_weight and gan_head_weight must be >= 0")
        if self.gan_weight > 0 and not self.real_latents:
            raise ValueError(
                "dmd2.gan_weight > 0 needs real image latents for the discriminator: set "
                "dmd2.real_latents to a file written by `python -m pipeline.real_latents` (VAE "
                "latents of real images with their captions), or keep gan_weight: 0 (DMD2's "
                "data-free stage)")


class DiscriminatorHead(torch.nn.Sequential):
    """D: the fake score's bottleneck features (B, C, s, s) -> one logit per sample (B,).

    The official head (``main/sd_guidance.py``, ``cls_pred_branch``): conv4×4/s2/p1 → GN(32) →
    SiLU stages halve the map down to 4×4 (one stage for SD1.5's 8×8 bottleneck, three for SDXL's
    32×32), then conv4×4/s4/p0 → GN(32) → SiLU reaches 1×1 and a 1×1 conv gives the logit.
    Departure, for bottlenecks under 4×4 only (the miniature world's teacher has 2×2): the
    last s×s conv covers the whole remaining map with stride s, as the 4×4/s4 one does at 4×4.
    """

    def __init__(self, channels: int, size: int):
        if size < 1 or size & (size - 1):
            raise ValueError(f"DMD2's discriminator head needs a square bottleneck of 2^k × 2^k "
                             f"(SD1.5: 8×8, SDXL: 32×32); this teacher's is {size}×{size}")
        if channels % 32:
            raise ValueError(f"DMD2's discriminator head uses GroupNorm(32): the bottleneck's "
                             f"{channels} channels must be a multiple of 32")
        c, layers, s = channels, [], size
        while s > 4:
            layers += [torch.nn.Conv2d(c, c, 4, stride=2, padding=1), torch.nn.GroupNorm(32, c),
                       torch.nn.SiLU()]
            s //= 2
        layers += [torch.nn.Conv2d(c, c, s, stride=s), torch.nn.GroupNorm(32, c),
                   torch.nn.SiLU(), torch.nn.Conv2d(c, 1, 1)]
        super().__init__(*layers)
        self.size = size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"bottleneck features are {tuple(features.shape[-2:])}, the head was "
                             f"built for the real latents' {self.size}×{self.size}: generate at "
                             "the real latents' resolution")
        return super().forward(features).flatten()


def _check_conditioning(real: RealLatents, unet_config, path: str) -> None:
    """One clear error when the real captions were encoded for another teacher."""
    dim, sdxl = real.cond.text.shape[-1], unet_config.get("addition_embed_type") == "text_time"
    if dim != unet_config["cross_attention_dim"] or sdxl != (real.cond.pooled is not None):
        raise ValueError(f"dmd2.real_latents: {path} holds caption embeddings of width {dim}"
                         f"{' with' if real.cond.pooled is not None else ' without'} pooled "
                         "embeddings, not this teacher's; re-encode it with this teacher "
                         "(`python -m pipeline.real_latents`)")


def bottleneck_size(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> int:
    """Side of a diffusers UNet's mid-block map for latents (h, w) (each downsampler halves)."""
    downs = sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
    h, w = (-(-n // 2 ** downs) for n in latent_hw)
    if h != w:
        raise ValueError(f"DMD2's discriminator head needs square latents; the real latents are "
                         f"{latent_hw[0]}×{latent_hw[1]}")
    return h


class DMD2:
    """Distribution matching with a full-copy fake score and TTUR; see the module docstring."""

    needs_pairs = False

    @staticmethod
    def teacher_unsupported(cfg: DMD2Config, traits: dict) -> str | None:
        """The GAN head (stage 2) needs a UNet teacher; the data-free stage fits every family."""
        if cfg.gan_weight > 0 and traits["family"] != "unet":
            return (f"DMD2's GAN head reads a diffusers UNet's mid block and a {traits['family']} "
                    "teacher is a transformer without one; set gan_weight: 0 (the data-free "
                    "stage)")
        return None
    student_groups = ("generator",)
    phase_starts: tuple[int, ...] = ()

    def __init__(self, cfg: DMD2Config, teacher: Teacher):
        self.cfg = cfg
        self.ema = cfg.ema
        self.schedule = teacher.schedule
        self.spec = score_generator(cfg.generator_steps, cfg.generator_t, "unit",
                                    teacher.schedule.num_timesteps)
        # DMD2's code updates the generator first in its iterations, then the fake score
        self.groups = (GroupSpec("generator", every=cfg.gen_update_ratio,
                                 max_grad_norm=cfg.max_grad_norm, warmup=cfg.warmup_steps),
                       GroupSpec("fake", max_grad_norm=cfg.max_grad_norm,
                                 warmup=cfg.warmup_steps))
        self.G_theta = teacher.student_copy()
        self.mu_fake = teacher.trainable_copy()
        self.mu_real = teacher.network.requires_grad_(False)
        self.head, self.real = None, None
        if cfg.gan_weight > 0:
            self._init_gan(cfg)
        if cfg.init_from:
            self._init_from(cfg.init_from)

    def _init_gan(self, cfg: DMD2Config) -> None:
        unet = getattr(self.mu_fake, "unet", None)
        if getattr(unet, "mid_block", None) is None:
            raise ValueError("DMD2's GAN head reads a diffusers UNet's mid block; this teacher "
                             "network has none (set gan_weight: 0)")
        self.real = load_real_latents(cfg.real_latents)
        _check_conditioning(self.real, unet.config, cfg.real_latents)
        self._features: list[torch.Tensor] = []
        unet.mid_block.register_forward_hook(self._keep_features)
        size = bottleneck_size(unet, tuple(self.real.latents.shape[-2:]))
        device = next(self.mu_fake.parameters()).device
        self.head = DiscriminatorHead(unet.config.block_out_channels[-1], size).to(device)

    def _init_from(self, path: str) -> None:
        """Stage 2: the generator and fake score (and D, if the checkpoint has one) from a
        checkpoint; like the official ``--ckpt_only_path``, no optimizer state or step."""
        from components.training import checkpoint_weights

        for name, module in self.state_modules().items():
            state = checkpoint_weights(Path(path), name)
            if state is None and name == "gan_head":
                continue  # a stage-1 checkpoint has no D: it starts at random
            if state is None:
                raise FileNotFoundError(f"dmd2.init_from: {path} holds no {name!r} weights; "
                                        "point it at a DMD2 run's checkpoint folder (step-N)")
            missing, unexpected = module.load_state_dict(state, strict=False)
            trained = {n for n, p in module.named_parameters() if p.requires_grad}
            if unexpected or trained & set(missing):
                raise ValueError(f"dmd2.init_from: {name!r} weights in {path} do not match this "
                                 f"teacher's network ({len(unexpected)} unexpected, "
                                 f"{len(trained & set(missing))} missing keys)")

    def _keep_features(self, _module, _inputs, out: torch.Tensor) -> None:
        self._features[:] = [out]  # only the latest pass's bottleneck

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        if group == "generator":
            return trainable(self.G_theta)
        head = list(self.head.parameters()) if self.head is not None else []
        return list(self.mu_fake.parameters()) + head

    def make_optimizer(self, group: str) -> torch.optim.Optimizer:
        lr = self.cfg.generator_lr if group == "generator" else self.cfg.fake_lr
        return torch.optim.AdamW(self.parameters(group), lr=lr, betas=tuple(self.cfg.adam_betas),
                                 weight_decay=self.cfg.weight_decay)

    def begin_phase(self, step: int) -> None:
        pass

    def student(self) -> torch.nn.Module:
        return self.G_theta

    def state_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"generator": self.G_theta, "fake": self.mu_fake}
        if self.head is not None:
            modules["gan_head"] = self.head
        return modules

    def _logits(self, x0: torch.Tensor, cond: TextConditioning, batch: Batch) -> torch.Tensor:
        """D(x_t) for latents x0 (B, C, h, w) captioned by ``cond``, noised at t ~ U{0, …, 999}
        (diffusion-GAN), per sample (B,)."""
        gen = batch.generator
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        x_t = self.schedule.add_noise(x0, eps, t.to(x0.device))
        self.mu_fake(x_t, t.to(x0.device), cond)
        return self.head(self._features[-1].float())

    def _real_batch(self, batch: Batch) -> tuple[torch.Tensor, TextConditioning]:
        """B real latents drawn with replacement, each with its own caption's conditioning."""
        idx = torch.randint(0, len(self.real), (batch.z.shape[0],), generator=batch.generator)
        latents, cond = self.real.rows(idx)
        return latents.to(batch.z), cond.to(batch.z.device)

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        if group == "generator":
            return self.distribution_matching_loss(batch, scratch)
        return self.fake_score_loss(batch, scratch)

    def distribution_matching_loss(self, batch: Batch,
                                   scratch: dict) -> tuple[torch.Tensor, dict]:
        """Per-sample ½‖x − sg[x − g]‖² (B,), whose gradient w.r.t. x is the DM direction g."""
        x = student_x0(self.G_theta, batch, self.spec)
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
        metrics = {"loss_dm": per_sample.mean(), "grad_norm_g": g.norm()}
        if self.head is not None:  # gradients reach x through the frozen fake score and head
            self.mu_fake.requires_grad_(False)
            self.head.requires_grad_(False)
            gan = torch.nn.functional.softplus(-self._logits(x, batch.cond, batch))
            self.mu_fake.requires_grad_(True)
            self.head.requires_grad_(True)
            per_sample = per_sample + self.cfg.gan_weight * gan
            metrics["loss_gan_g"] = gan.mean()
        return per_sample, metrics

    def fake_score_loss(self, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        """Unweighted ε-MSE of the fake score on the generator's current samples (B,)."""
        x = scratch.get("x")
        if x is None:  # a fake-only iteration: sample the generator without gradients
            with torch.no_grad():
                x = student_x0(self.G_theta, batch, self.spec)
        gen = batch.generator
        t = torch.randint(0, self.schedule.num_timesteps, (x.shape[0],), generator=gen)
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        t = t.to(x.device)
        x_t = self.schedule.add_noise(x, eps, t)
        eps_fake = predict_eps(self.mu_fake, x_t, t, batch.cond)
        per_sample = ((eps_fake - eps) ** 2).flatten(1).mean(1)
        metrics = {"loss_fake": per_sample.mean()}
        if self.head is not None:
            softplus = torch.nn.functional.softplus
            real, real_cond = self._real_batch(batch)
            d_loss = (softplus(self._logits(x.detach(), batch.cond, batch))
                      + softplus(-self._logits(real, real_cond, batch)))
            per_sample = per_sample + self.cfg.gan_head_weight * d_loss
            metrics["loss_gan_d"] = d_loss.mean()
        return per_sample, metrics


@register("dmd2", DMD2Config)
def build(cfg: DMD2Config, teacher: Teacher, steps: int) -> DMD2:
    return DMD2(cfg, teacher)
