"""Training of the teacher's parts: the VAE on pixels, then UNet and text encoder on latents.

Both loops draw batches from a seeded generator and stop after ``steps`` (deterministic) or when
``max_seconds`` runs out (a safety cap; the report says which one stopped it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from components.ema import EMA, EMAConfig
from components.world.config import UNetConfig, VaeConfig
from components.world.models import train_scheduler

Log = Callable[[dict, int], None]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Budget:
    """Counts steps and wall time; ``done`` when either runs out (max_seconds 0: no time cap)."""

    def __init__(self, steps: int, max_seconds: float):
        self.steps, self.max_seconds = steps, max_seconds
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.step = 0
        self.loss: float | None = None  # the running (exponentially smoothed) loss

    def advance(self, loss: float, log: Log, name: str) -> None:
        """Count one step of loss ``loss``; log the running loss as ``name`` every 50 steps."""
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        self.step += 1
        if self.step % 50 == 0:
            log({name: self.loss}, self.step)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def done(self) -> bool:
        over_time = self.max_seconds > 0 and self.seconds > self.max_seconds
        return self.step >= self.steps or over_time

    def report(self, loss: float) -> dict:
        by = "steps" if self.step >= self.steps else "time"
        cpu = time.process_time() - self.cpu_start
        return {
            "steps": self.step,
            "seconds": round(self.seconds, 1),
            "stopped_by": by,
            "cpu_seconds": round(cpu, 1),
            "final_loss": loss,
        }


def train_vae(
    vae: AutoencoderKL, images: torch.Tensor, cfg: VaeConfig, seed: int, log: Log
) -> dict:
    """Reconstruction MSE + kl_weight * KL on uint8 (N, H, W, 3) images; returns a report."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    budget = Budget(cfg.steps, cfg.max_seconds)
    vae.train()
    while not budget.done():
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(budget.step, cfg.steps, warmup=20)
        x = to_pixels(images[torch.randint(len(images), (cfg.batch,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        budget.advance(loss.item(), log, "vae/loss")
    vae.eval()
    return budget.report(budget.loss)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of uint8 (N, H, W, 3) images, unscaled: (N, C, H/f, W/f)."""
    chunks = [
        vae.encode(to_pixels(images[i : i + batch])).latent_dist.mean
        for i in range(0, len(images), batch)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> dict:
    """MSE (on [0, 1] pixels) and PSNR in dB of decode(encode mean) over uint8 images."""
    errors = []
    for i in range(0, len(images), batch):
        x = to_pixels(images[i : i + batch])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        errors.append(((recon - x) / 2).pow(2).mean((1, 2, 3)))
    mse = torch.cat(errors).mean().item()
    return {"mse": mse, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12))}


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The VAE's uint8 (N, H, W, 3) reconstructions (decoded posterior means) of uint8 images."""
    out = []
    for i in range(0, len(images), batch):
        latents = vae.encode(to_pixels(images[i : i + batch])).latent_dist.mean
        x = vae.decode(latents).sample.clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out)


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight for an epsilon loss: min(SNR, gamma) / SNR (1 where gamma is 0)."""
    if gamma <= 0:
        return torch.ones_like(snr)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    z0: torch.Tensor,
    ids: torch.Tensor,
    abar: torch.Tensor,
    gamma: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Epsilon-prediction loss on scaled latents z0 (B, C, h, w) with token ids (B, 77).

    abar: (T,) cumulative products of alphas of the training schedule.
    """
    t = torch.randint(0, len(abar), (len(z0),), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    a = abar[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    pred = unet(zt, t, text_encoder(ids)[0]).sample
    weight = min_snr_weight(abar[t] / (1 - abar[t]), gamma)
    return (weight * (pred - eps).pow(2).mean((1, 2, 3))).mean()


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    cfg: UNetConfig,
    seed: int,
    log: Log,
) -> dict:
    """Train UNet and text encoder jointly; returns a report.

    latents: scaled (N, C, h, w); ids: (N, 77) token ids; empty_ids: (77,) ids of the empty prompt.
    """
    gen = torch.Generator().manual_seed(seed)
    abar = train_scheduler().alphas_cumprod
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    both = torch.nn.ModuleList([unet, text_encoder])
    ema = EMA(both, EMAConfig("constant", cfg.ema), cfg.batch) if cfg.ema > 0 else None
    budget = Budget(cfg.steps, cfg.max_seconds)
    unet.train(), text_encoder.train()
    while not budget.done():
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(budget.step, cfg.steps, cfg.warmup)
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        batch_ids = torch.where(drop[:, None], empty_ids[None], ids[idx])
        loss = diffusion_loss(unet, text_encoder, latents[idx], batch_ids, abar, cfg.snr_gamma, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update(both, budget.step + 1)
        budget.advance(loss.item(), log, "unet/loss")
    if ema is not None:
        ema.copy_to(both)
    unet.eval(), text_encoder.eval()
    return budget.report(budget.loss)


def flow_matching_loss(pipe, z0: torch.Tensor, captions: list[str], shift: float,
                       t5_length: int, gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss of an SD3 pipeline's transformer on scaled latents z0 (B, C, h, w):
    ``x_t = (1 − σ) z0 + σ ε``, target velocity ``ε − z0``, σ = shift(u) with u logit-normal
    (SD3's sampling), the transformer fed ``1000 σ`` as the pipeline feeds it. The captions go
    through the pipeline's own ``encode_prompt`` (with gradients), so the text encoders train
    on exactly the conditioning the pipeline computes at generation."""
    from components.schedules import shift_sigma

    text, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None,
                                            device=z0.device, do_classifier_free_guidance=False,
                                            max_sequence_length=t5_length)
    u = torch.sigmoid(torch.randn(len(z0), generator=gen))
    sigma = shift_sigma(u, shift)
    eps = torch.randn(z0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * z0 + s * eps
    pred = pipe.transformer(hidden_states=x_t, timestep=1000 * sigma,
                            encoder_hidden_states=text, pooled_projections=pooled,
                            return_dict=False)[0]
    return (pred - (eps - z0)).pow(2).mean()


def train_sd3(pipe, latents: torch.Tensor, captions: list[str], cfg, seed: int,
              log: Log) -> dict:
    """Train an SD3 pipeline's transformer and its three text encoders jointly by flow matching
    (``world.sd3``: ``SD3Config``); captions are dropped to the empty prompt with probability
    ``caption_dropout`` (the unconditional input of CFG). Returns a report."""
    gen = torch.Generator().manual_seed(seed)
    modules = torch.nn.ModuleList([pipe.transformer, pipe.text_encoder, pipe.text_encoder_2,
                                   pipe.text_encoder_3])
    params = list(modules.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    budget = Budget(cfg.steps, cfg.max_seconds)
    modules.train()
    while not budget.done():
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(budget.step, cfg.steps, cfg.warmup)
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        batch = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        loss = flow_matching_loss(pipe, latents[idx], batch, cfg.shift, cfg.t5_length, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        budget.advance(loss.item(), log, "sd3/loss")
    modules.eval()
    return budget.report(budget.loss)
