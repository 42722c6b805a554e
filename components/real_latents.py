"""Real image latents with their captions' text conditioning (DMD2's GAN data).

On-disk format (one safetensors file, written atomically):
    latents   (N, C, h, w)  float   VAE latents (a posterior sample) times the VAE's scaling factor
    text      (N, L, D)     float   the teacher's text embedding of each image's own caption
    pooled    (N, P)        float   SDXL only: the pooled text embedding
    time_ids  (N, 6)        float   SDXL only: original size, crop top-left, target size
metadata: ``format`` = ``distillery.real_latents/1``, ``captions`` = a JSON list of the N captions.
Row i of every tensor belongs to image i. ``python -m pipeline.real_latents`` writes such a file
from a folder of images and a captions JSON, with the teacher's own VAE and text encoder(s).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.io import atomic_write_bytes
from components.teacher import TextConditioning

FORMAT = "distillery.real_latents/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAKE_HINT = ("write it with `python -m pipeline.real_latents --teacher <teacher folder> "
             "--images <folder with captions.json> --out <file>`")


class RealLatentsError(ValueError):
    """A real-latents file that cannot be used as it is."""


@dataclass
class RealLatents:
    """N real images as latents (N, C, h, w), each with its caption's conditioning (N rows)."""

    latents: torch.Tensor
    cond: TextConditioning
    captions: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, TextConditioning]:
        """Latents and conditioning of the images ``index`` (B,)."""
        return self.latents[index], self.cond.rows(index)


def save_real_latents(path: str | Path, data: RealLatents) -> None:
    from safetensors.torch import save

    tensors = {"latents": data.latents, "text": data.cond.text}
    if data.cond.pooled is not None:
        tensors.update(pooled=data.cond.pooled, time_ids=data.cond.time_ids)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "captions": json.dumps(list(data.captions))}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_real_latents(path: str | Path) -> RealLatents:
    """Read a real-latents file; a file without the captions' conditioning is refused."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"real latents file {path} not found; {MAKE_HINT}")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata() or {}
        tensors = {k: f.get_tensor(k).float() for k in keys}
    if "latents" not in keys or "text" not in keys:
        raise RealLatentsError(
            f"{path} lacks {'latents' if 'latents' not in keys else 'text'}: a real-latents "
            "file holds 'latents' (N, C, h, w) and the text conditioning of each image's own "
            f"caption ('text' (N, L, D), plus 'pooled' and 'time_ids' for SDXL); {MAKE_HINT}")
    n = tensors["latents"].shape[0]
    if any(t.shape[0] != n for t in tensors.values()) or ("pooled" in keys) != (
            "time_ids" in keys):
        raise RealLatentsError(f"{path}: every tensor needs one row per image ({n}) and "
                               f"'pooled' comes with 'time_ids'; {MAKE_HINT}")
    cond = TextConditioning(tensors["text"], tensors.get("pooled"), tensors.get("time_ids"))
    return RealLatents(tensors["latents"], cond, json.loads(meta.get("captions", "[]")))


def read_captions(folder: str | Path, captions: str | Path | None = None) -> dict[str, str]:
    """``{image file name: caption}`` from ``captions`` (default ``folder/captions.json``)."""
    folder = Path(folder)
    file = Path(captions) if captions else folder / "captions.json"
    if not file.is_file():
        raise FileNotFoundError(f"no captions file {file}: give a JSON object mapping each image "
                                "file name in the folder to its caption")
    table = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(table, dict) or not table:
        raise RealLatentsError(f"{file} must be a non-empty JSON object {{file name: caption}}")
    missing = [name for name in table if not (folder / name).is_file()]
    if missing:
        raise RealLatentsError(f"{file} names {len(missing)} image(s) not in {folder}, "
                               f"e.g. {missing[0]!r}")
    return table


def load_image(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """An RGB image resized (shorter side) and centre-cropped to ``size`` = (H, W): pixels in
    [-1, 1] (3, H, W) and SDXL's micro-conditioning (orig. H, orig. W, crop top, crop left)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        orig_w, orig_h = img.size
        scale = max(size[0] / orig_h, size[1] / orig_w)
        new_w, new_h = max(size[1], round(orig_w * scale)), max(size[0], round(orig_h * scale))
        img = img.resize((new_w, new_h), Image.LANCZOS)
        top, left = (new_h - size[0]) // 2, (new_w - size[1]) // 2
        img = img.crop((left, top, left + size[1], top + size[0]))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, (orig_h, orig_w, top, left)


@torch.no_grad()
def encode_images(pipe: Any, files: Sequence[Path], captions: Sequence[str],
                  latent_hw: tuple[int, int], batch: int = 16, seed: int = 0) -> RealLatents:
    """Encode images with the pipeline's VAE at latent size ``latent_hw`` (a posterior sample,
    seeded, in the model's latent space: ``(z − shift) · scale``, as DMD2's data script
    and SD3's training scripts do) and their captions with its
    text encoder(s). The pipeline's UNet is not needed."""
    from components.generation import encode_prompts, latents_from_vae

    size = (latent_hw[0] * pipe.vae_scale_factor, latent_hw[1] * pipe.vae_scale_factor)
    vae, gen = pipe.vae, torch.Generator().manual_seed(seed)
    latents, conds = [], []
    for start in range(0, len(files), batch):
        loaded = [load_image(f, size) for f in files[start:start + batch]]
        pixels = torch.stack([p for p, _ in loaded]).to(vae.device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=gen).to(dist.mean)
        latents.append(latents_from_vae((dist.mean + dist.std * eps).float(), vae).cpu())
        cond = encode_prompts(pipe, captions[start:start + batch])
        if cond.time_ids is not None:  # each image's own size and crop, as SDXL was trained
            ids = [[oh, ow, top, left, size[0], size[1]] for _, (oh, ow, top, left) in loaded]
            cond = TextConditioning(cond.text, cond.pooled, torch.tensor(ids).to(cond.time_ids))
        conds.append(cond.to("cpu"))
    cond = conds[0]
    for more in conds[1:]:
        cond = cond.concat(more)
    return RealLatents(torch.cat(latents), cond, list(captions))
