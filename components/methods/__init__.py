"""Distillation methods: one file each, registered by name in ``METHODS``.

A method says which modules train in which optimizer group, how often each group updates, and the
loss of each group at a step. The training loop (``components.training``) owns everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from components.teacher import TextConditioning


@dataclass
class Batch:
    """One training batch of a data-free method: prompt embeddings and generator noise."""

    cond: TextConditioning  # (B, L, D)
    uncond: TextConditioning  # (B, L, D), the empty prompt
    z: torch.Tensor  # (B, C, h, w)
    generator: torch.Generator  # per-step randomness, so a resumed run repeats exactly


@dataclass(frozen=True)
class GroupSpec:
    """An optimizer group: its name, its update period (iterations) and its grad-norm clip."""

    name: str
    every: int = 1
    max_grad_norm: float | None = None


class Method(Protocol):
    """What the training loop needs of a method."""

    groups: tuple[GroupSpec, ...]  # in update order within an iteration

    def parameters(self, group: str) -> list[torch.nn.Parameter]: ...

    def make_optimizer(self, group: str) -> torch.optim.Optimizer: ...

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of ``group``; ``scratch`` carries values between groups of one iteration."""
        ...

    def student(self) -> torch.nn.Module:
        """The generator network (what EMA tracks and what is saved)."""
        ...

    def state_modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose trainable weights a checkpoint must hold."""
        ...


MethodFactory = Callable[..., Method]
METHODS: dict[str, tuple[type, MethodFactory]] = {}


def register(name: str, config_cls: type) -> Callable[[MethodFactory], MethodFactory]:
    """Register a method factory ``(cfg, teacher_unet, schedule, ...) -> Method`` under ``name``."""
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


def _load_all() -> None:
    from components.methods import swiftbrush  # noqa: F401


