"""The miniature world's CLIP scorer: a small open_clip model trained contrastively (CLIP, Radford et
al. 2021, arXiv 2103.00020v1, the symmetric InfoNCE loss of its Figure 3).

No pretrained CLIP exists offline, so the world's CLIP score uses a small ``open_clip.CLIP`` (a ViT
for 32x32 images, a text transformer on the standard open_clip BPE vocabulary) trained here on the
world's (image, caption) pairs. It is saved in open_clip's own local folder format
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so ``clip_score.load_scorer`` loads it
through exactly the code path that loads ViT-g-14.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.io import atomic_dir, write_json

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ScorerConfig:
    """Architecture and training budget of the world's CLIP scorer (a ``params.yaml`` section)."""

    name: str = "distillery-scorer-vit-t4-32"
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 3
    head_width: int = 32
    context_length: int = 32
    embed_dim: int = 128
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    max_steps: int = 2000
    max_seconds: float = 300.0
    holdout_fraction: float = 0.1
    log_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        for width in (self.vision_width, self.text_width):
            if width % self.head_width:
                raise ValueError("vision_width and text_width must be multiples of head_width")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError("holdout_fraction must be in (0, 1)")
        if self.max_steps < 1 or self.max_seconds <= 0 or self.batch_size < 2:
            raise ValueError("max_steps >= 1, max_seconds > 0 and batch_size >= 2 are required")

    def model_cfg(self) -> dict:
        """open_clip model config (the ``model_cfg`` of ``open_clip_config.json``)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size,
                           "width": self.vision_width, "layers": self.vision_layers,
                           "head_width": self.head_width},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408,
                         "width": self.text_width, "heads": self.text_width // self.head_width,
                         "layers": self.text_layers},
        }

    def preprocess_cfg(self) -> dict:
        return {"size": self.image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                "interpolation": "bicubic", "resize_mode": "shortest"}


def train_scorer(images: np.ndarray, captions: Sequence[str], cfg: ScorerConfig,
                 out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Train the scorer on uint8 images ``(N, S, S, 3)`` and their captions; save it to ``out_dir``.

    Stops at ``cfg.max_steps`` or ``cfg.max_seconds``, whichever comes first. Returns a report
    with the caption->image top-1 retrieval accuracy on a held-out split.
    """
    import open_clip

    cfg.validate()
    images = _check_images(images, cfg.image_size)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)(list(captions))
    pixels = normalize_images(images)
    train_idx, held_idx = split_indices(len(images), cfg.holdout_fraction, cfg.seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = open_clip.CLIP(**cfg.model_cfg())
    steps, seconds, loss = _fit(model, pixels[train_idx], tokens[train_idx], cfg, log)
    held_captions = [captions[i] for i in held_idx]
    top1, chance = retrieval_top1(model, pixels[held_idx], tokens[held_idx], held_captions)
    save_scorer(model, cfg, out_dir)
    report = {"name": cfg.name, "steps": steps, "seconds": round(seconds, 2), "final_loss": loss,
              "train_pairs": len(train_idx), "heldout_pairs": len(held_idx),
              "retrieval_top1": top1, "retrieval_chance": chance,
              "parameters": sum(p.numel() for p in model.parameters())}
    log(f"scorer: {report}")
    return report


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the (B, B) cosine-similarity logits; pair i matches i."""
    logits = scale * image_emb @ text_emb.T  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, S, S, 3)`` -> float ``(N, 3, S, S)`` normalised like open_clip's preprocess.

    For images already at the model's size the preprocess resize/crop is the identity, so this
    fast path and ``clip_score``'s PIL path see the same pixels.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation split into (train, held-out) indices; at least one of each."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(max(1, round(n * holdout_fraction)), n - 1)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


@torch.no_grad()
def retrieval_top1(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor,
                   captions: Sequence[str]) -> tuple[float, float]:
    """Caption->image top-1 accuracy among the given pairs, and its chance level.

    A hit is a retrieved image whose own caption equals the query caption, so duplicate captions
    in a procedural world count as correct; chance is the mean share of such images.
    """
    model.eval()
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    best = (txt @ img.T).argmax(dim=1).numpy()
    caps = np.asarray(captions, dtype=object)
    same = caps[:, None] == caps[None, :]  # (N, N) query caption vs image caption
    top1 = float(same[np.arange(len(caps)), best].mean())
    return top1, float(same.mean(axis=1).mean())


def save_scorer(model: torch.nn.Module, cfg: ScorerConfig, out_dir: str | Path) -> None:
    """Write the open_clip local folder: config (with ``name``) and safetensors weights, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / CONFIG_FILE, {"name": cfg.name, "model_cfg": cfg.model_cfg(),
                                       "preprocess_cfg": cfg.preprocess_cfg(),
                                       "scorer_config": asdict(cfg)})
        save_file(state, str(tmp / WEIGHTS_FILE))


def _fit(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, cfg: ScorerConfig,
         log: Callable[[str], None]) -> tuple[int, float, float]:
    """AdamW with linear warm-up and cosine decay; returns (steps, seconds, last loss)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, len(pixels))
    start, step, loss = time.monotonic(), 0, float("nan")
    model.train()
    while step < cfg.max_steps and time.monotonic() - start < cfg.max_seconds:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps, cfg.max_steps)
        idx = torch.randperm(len(pixels), generator=gen)[:batch]
        image_emb, text_emb, scale = model(pixels[idx], tokens[idx])
        value = clip_loss(image_emb, text_emb, scale)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        step, loss = step + 1, value.item()
        if step % cfg.log_every == 0:
            log(f"scorer step {step}: loss {loss:.4f} ({time.monotonic() - start:.1f} s)")
    return step, time.monotonic() - start, loss


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _check_images(images: np.ndarray, size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"expected uint8 images (N, {size}, {size}, 3), got {images.dtype} "
                         f"{images.shape}")
    return images
