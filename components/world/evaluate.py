"""Does the teacher follow its captions? Sample it with the plain diffusers pipeline and judge.

The pipeline is either family's (``StableDiffusionPipeline`` or ``StableDiffusion3Pipeline``),
called with its own defaults; an SD3 pipeline with its T5 encoder is told the T5 length the
teacher was trained on (its tokenizer's ``model_max_length``), as every other consumer is."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline

from components.world.render import attribute_accuracy


@torch.no_grad()
def sample_pipeline(
    pipe: DiffusionPipeline,
    captions: list[str],
    steps: int,
    guidance_scale: float,
    seed: int,
    batch: int = 64,
) -> np.ndarray:
    """uint8 (N, H, W, 3); image i is seeded with seed + i whatever the batch size."""
    extra = {}
    if getattr(pipe, "tokenizer_3", None) is not None:
        from components.networks.sd3 import t5_length

        extra["max_sequence_length"] = t5_length(pipe)
    out = []
    for i in range(0, len(captions), batch):
        chunk = captions[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(
            prompt=chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="np",
            **extra,
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def teacher_accuracy(
    pipe: DiffusionPipeline,
    captions: list[str],
    settings: dict[str, tuple[int, float]],
    seed: int,
) -> dict[str, dict[str, float]]:
    """Attribute accuracy per named sampler setting, e.g. {"cfg": (25, 4.0), "one_step": (1, 1.0)}.

    Each setting is (DDIM steps, guidance_scale).
    """
    pipe.set_progress_bar_config(disable=True)
    return {
        name: attribute_accuracy(sample_pipeline(pipe, captions, steps, scale, seed), captions)
        for name, (steps, scale) in settings.items()
    }
