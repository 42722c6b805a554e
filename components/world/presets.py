"""Presets for the ``world`` params section, as YAML-ready dicts.

Measured figures: filled in below once measured.
"""

from __future__ import annotations

from components.config import from_dict
from components.world.config import WorldConfig

PRESETS: dict[str, dict] = {
    "micro": {
        "seed": 0,
        "data": {
            "image_size": 32,
            "n_train": 256,
            "n_reference": 32,
            "n_eval": 16,
            "holdout": 0.1,
            "space": {"colours": ["red", "blue"], "max_objects": 1},
        },
        "vae": {"channels": [16, 32, 32], "steps": 10, "batch": 16},
        "text": {"hidden": 32, "layers": 1, "heads": 2},
        "unet": {"channels": [32, 32], "attention": [False, True], "steps": 10, "batch": 16},
        "check": {"n_samples": 4, "steps": 2, "guidance_scale": 4.0},
    },
    "default": {
        "seed": 0,
        "data": {
            "image_size": 32,
            "n_train": 20000,
            "n_reference": 512,
            "n_eval": 256,
            "holdout": 0.1,
            "space": {
                "shapes": ["circle", "square", "triangle"],
                "colours": ["red", "green", "blue", "yellow"],
                "sizes": ["small", "large"],
                "positions": ["top left", "top right", "bottom left", "bottom right"],
                "backgrounds": ["gray", "black", "white"],
                "min_objects": 1,
                "max_objects": 1,
            },
        },
        "vae": {
            "channels": [32, 64, 64],
            "latent_channels": 4,
            "layers_per_block": 1,
            "steps": 600,
            "max_seconds": 0.0,
            "batch": 32,
            "lr": 2e-3,
            "kl_weight": 1e-6,
        },
        "text": {"hidden": 128, "layers": 2, "heads": 4},
        "unet": {
            "channels": [64, 128, 128],
            "attention": [False, True, True],
            "layers_per_block": 1,
            "head_dim": 8,
            "steps": 700,
            "max_seconds": 0.0,
            "batch": 64,
            "lr": 1e-3,
            "warmup": 50,
            "ema": 0.0,
            "caption_dropout": 0.1,
            "snr_gamma": 5.0,
        },
        "check": {"n_samples": 256, "steps": 25, "guidance_scale": 4.0},
    },
    "gpu": {
        "seed": 0,
        "data": {
            "image_size": 64,
            "n_train": 100000,
            "n_reference": 5000,
            "n_eval": 1000,
            "holdout": 0.1,
            "space": {
                "colours": ["red", "green", "blue", "yellow", "purple", "orange"],
                "max_objects": 2,
            },
        },
        "vae": {"channels": [64, 128, 128], "steps": 5000, "batch": 128, "lr": 5e-4},
        "text": {"hidden": 256, "layers": 4, "heads": 4},
        "unet": {
            "channels": [128, 256, 256],
            "attention": [False, True, True],
            "layers_per_block": 2,
            "head_dim": 32,
            "steps": 30000,
            "batch": 256,
            "lr": 3e-4,
            "warmup": 500,
            "ema": 0.999,
        },
        "check": {"n_samples": 1000, "steps": 25, "guidance_scale": 4.0},
    },
}


def preset(name: str) -> WorldConfig:
    """The named preset as a validated ``WorldConfig``."""
    if name not in PRESETS:
        raise KeyError(f"unknown world preset {name!r}; valid: {sorted(PRESETS)}")
    return from_dict(WorldConfig, PRESETS[name], f"world[{name}]")
