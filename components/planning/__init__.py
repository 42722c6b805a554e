"""The run planner: memory per GPU, FLOPs, time and GPU-hours of a distillation run, from one
traced iteration of the real method on ``meta`` tensors (``uv run python -m pipeline.plan``).

``trace`` runs the iteration, ``kernels`` models what a GPU computes differently (fused attention,
autocast), ``estimate`` turns traces into memory per GPU and time, ``gpus`` knows the GPUs, and
``planner`` composes the plan and its suggestion.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from components.planning.gpus import GPUS, get_gpu
from components.planning.planner import PlanRequest, make_plan
from components.planning.trace import TeacherSpec

__all__ = ["GPUS", "PlanRequest", "TeacherSpec", "get_gpu", "make_plan", "traceable_config"]


def traceable_config(cfg: Any) -> tuple[Any, list[str]]:
    """A method config the planner can trace without weights it does not have, and what that
    leaves out: InstaFlow's LPIPS phase needs the LPIPS backbone's ImageNet weights."""
    notes = []
    if getattr(cfg, "lpips_fraction", 0) > 0:
        notes.append(f"the LPIPS phase ({cfg.lpips_fraction:.0%} of distillation: VAE decode + "
                     "LPIPS backward) is traced with the L2 loss")
        cfg = replace(cfg, lpips_fraction=0.0)
    return cfg, notes
