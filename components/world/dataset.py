"""The world's splits as arrays: rendering with a caption-level hold-out for evaluation.

A caption is held out when a hash of (seed, caption) falls below ``holdout``; `train` draws only
other captions, `eval` and `reference` only held-out ones, so no evaluation caption is ever a
training caption. With ``holdout == 0`` every split draws from the whole caption space.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from components.world.config import DataConfig
from components.world.render import SceneSpace, caption, render, sample_scene

SPLITS = ("train", "reference", "eval")
_MAX_TRIES = 1000  # draws per image before concluding that the wanted captions do not exist


def is_held_out(text: str, fraction: float, seed: int) -> bool:
    """Whether ``text`` belongs to the evaluation side of the caption split."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def caption_space_size(space: SceneSpace) -> int:
    """How many distinct captions the space can produce."""
    per_object = len(space.shapes) * len(space.colours) * len(space.sizes)
    layouts = sum(
        math.comb(len(space.positions), n) * per_object**n
        for n in range(space.min_objects, space.max_objects + 1)
    )
    return layouts * len(space.backgrounds)


def sample_split(
    cfg: DataConfig, n: int, held_out: bool | None, seed: int, stream: int
) -> tuple[np.ndarray, list[str]]:
    """n images uint8 (n, S, S, 3) and captions; held_out None: any caption."""
    rng = np.random.default_rng([seed, stream])
    images, captions = [], []
    for _ in range(n):
        for _ in range(_MAX_TRIES):
            scene = sample_scene(cfg.space, rng)
            text = caption(scene)
            if held_out is None or is_held_out(text, cfg.holdout, seed) == held_out:
                break
        else:
            raise ValueError(
                f"no {'held-out' if held_out else 'training'} captions; "
                f"change data.holdout ({cfg.holdout})"
            )
        images.append(render(scene, cfg.image_size, rng))
        captions.append(text)
    return np.stack(images), captions


def render_splits(cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, list[str]]]:
    """All three splits: `train`, `reference` (FID images) and `eval` (captions + images)."""
    split = cfg.holdout > 0
    return {
        "train": sample_split(cfg, cfg.n_train, False if split else None, seed, 0),
        "reference": sample_split(cfg, cfg.n_reference, True if split else None, seed, 1),
        "eval": sample_split(cfg, cfg.n_eval, True if split else None, seed, 2),
    }


def split_summary(splits: dict[str, tuple[np.ndarray, list[str]]], cfg: DataConfig) -> dict:
    """Caption counts and the train/eval caption overlap, for the build report."""
    train = set(splits["train"][1])
    evals = set(splits["eval"][1])
    return {
        "caption_space": caption_space_size(cfg.space),
        "train_captions": len(train),
        "eval_captions": len(evals),
        "eval_captions_in_train": len(evals & train),
        "images": {name: len(caps) for name, (_, caps) in splits.items()},
    }
