"""Distillation methods: one file each, registered by name in ``METHODS``.

A method says which modules train in which optimizer group, how often each group updates, and the
loss of each group at a step. The training loop (``components.training``) owns everything else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from components.teacher import TextConditioning


@dataclass
class Batch:
    """One training batch: prompt embeddings, generator noise and, for pair methods, the teacher's
    sample ``x1`` of each noise ``z`` (same prompt)."""

    cond: TextConditioning  # (B, L, D)
    uncond: TextConditioning  # (B, L, D), the empty prompt
    z: torch.Tensor  # (B, C, h, w)
    generator: torch.Generator  # per-step randomness, so a resumed run repeats exactly
    step: int = 0  # the iteration this batch belongs to (methods with phases read it)
    x1: torch.Tensor | None = None  # (B, C, h, w) teacher ODE sample from z, pair methods only

    def rows(self, sl: slice) -> Batch:
        """A micro-batch: the rows ``sl`` of every per-sample field."""
        return Batch(self.cond.rows(sl), self.uncond.rows(sl), self.z[sl], self.generator,
                     self.step, None if self.x1 is None else self.x1[sl])


@dataclass
class Teacher:
    """What a method is built from: the frozen teacher network behind the ``Denoiser`` protocol
    (``network(x_t, t, cond, timestep_cond=None)``, with ``.schedule`` and ``.prediction_type``),
    and optionally the latent decoder (latents → images in [-1, 1]) for image-space losses."""

    network: torch.nn.Module
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def schedule(self):
        return self.network.schedule

    def trainable_copy(self) -> torch.nn.Module:
        """A full copy of the teacher network that trains (student or fake score init)."""
        return copy.deepcopy(self.network).train().requires_grad_(True)

    def frozen_copy(self) -> torch.nn.Module:
        return copy.deepcopy(self.network).eval().requires_grad_(False)


@dataclass(frozen=True)
class GroupSpec:
    """An optimizer group: its name, its update period (iterations), its grad-norm clip, the
    iterations ``[start, stop)`` it is active in (methods with phases, e.g. reflow then distill)
    and a linear learning-rate warm-up over its first ``warmup`` updates."""

    name: str
    every: int = 1
    max_grad_norm: float | None = None
    start: int = 0
    stop: int | None = None
    warmup: int = 0

    def updates_before(self, step: int) -> int:
        """How many updates this group made in iterations before ``step``."""
        end = step if self.stop is None else min(step, self.stop)
        return 0 if end <= self.start else (end - self.start - 1) // self.every + 1

    def lr_factor(self, step: int) -> float:
        if self.warmup <= 0:
            return 1.0
        return min(1.0, (self.updates_before(step) + 1) / self.warmup)

    def active(self, step: int) -> bool:
        if step < self.start or (self.stop is not None and step >= self.stop):
            return False
        return (step - self.start) % self.every == 0


class Method(Protocol):
    """What the training loop needs of a method."""

    groups: tuple[GroupSpec, ...]  # in update order within an iteration
    spec: Any  # components.generation.GeneratorSpec: how the student generates
    needs_pairs: bool  # batches must carry the teacher's ODE sample x1 of each z

    def parameters(self, group: str) -> list[torch.nn.Parameter]: ...

    def make_optimizer(self, group: str) -> torch.optim.Optimizer: ...

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of ``group``; ``scratch`` carries values between groups of one iteration."""
        ...

    def student(self) -> torch.nn.Module:
        """The generator network as a ``Denoiser`` module (what EMA tracks and what is saved)."""
        ...

    def state_modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose trainable weights a checkpoint must hold."""
        ...


MethodFactory = Callable[..., Method]
METHODS: dict[str, tuple[type, MethodFactory]] = {}


def register(name: str, config_cls: type) -> Callable[[MethodFactory], MethodFactory]:
    """Register a method factory ``(cfg, teacher: Teacher, steps: int) -> Method`` under ``name``.

    ``steps`` is the run's iteration count (methods with phases split it)."""
    def wrap(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = (config_cls, factory)
        return factory
    return wrap


def method_names() -> list[str]:
    _load_all()
    return sorted(METHODS)


def get_method(name: str) -> tuple[type, MethodFactory]:
    _load_all()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; valid methods are: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def needs_pairs(name: str) -> bool:
    """Whether method ``name`` trains on teacher ODE pairs (its class says; nothing is built)."""
    import typing

    _, build = get_method(name)
    return bool(typing.get_type_hints(build)["return"].needs_pairs)


def _load_all() -> None:
    from components.methods import (  # noqa: F401
        dmd2,
        instaflow,
        meng,
        sid_lsg,
        swiftbrush,
    )


