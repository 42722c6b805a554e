"""The run planner: memory per GPU, FLOPs, time and GPU-hours of a distillation run, from one
traced iteration of the real method on ``meta`` tensors (``uv run python -m pipeline.plan``).

``teachers`` builds the teacher of each family from its configs, ``trace`` runs the iteration, ``kernels`` models what a GPU computes differently (fused attention,
autocast), ``estimate`` turns traces into memory per GPU and time, ``gpus`` knows the GPUs, and
``planner`` composes the plan and its suggestion.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from components.planning.gpus import GPUS, get_gpu
from components.planning.planner import PlanRequest, make_plan
from components.planning.teachers import TeacherSpec, flow_spec

__all__ = ["GPUS", "PlanRequest", "TeacherSpec", "flow_spec", "get_gpu", "make_plan",
           "shortened_config", "traceable_config"]


def traceable_config(cfg: Any) -> tuple[Any, list[str]]:
    """A method config the planner can trace without weights it does not have, and what that
    leaves out: InstaFlow's LPIPS phase needs the LPIPS backbone's ImageNet weights."""
    notes = []
    if getattr(cfg, "lpips_fraction", 0) > 0:
        notes.append(f"the LPIPS phase ({cfg.lpips_fraction:.0%} of distillation: VAE decode + "
                     "LPIPS backward) is traced with the L2 loss")
        cfg = replace(cfg, lpips_fraction=0.0)
    return cfg, notes


def shortened_config(cfg: Any) -> tuple[Any, tuple[tuple[str, str, int], ...]]:
    """A method config whose sampling loops the planner traces two steps of, and for each
    (group, network attribute, calls left out): InstaFlow's distillation solves the 2-RF's ODE
    in ``distill_ode_steps`` Euler steps, one guided call of the frozen 2-RF each, under no
    gradient. From the second step on every step holds the same tensors (the noise, the previous
    state, one call's temporaries), so two steps reach the peak of any number, and the steps
    left out add one traced call's FLOPs each (elementwise updates count none)."""
    n = getattr(cfg, "distill_ode_steps", 0)
    if n <= 2:
        return cfg, ()
    return replace(cfg, distill_ode_steps=2), (("distill", "rf2", n - 2),)
