"""Distillation methods: one file each, registered by name in ``METHODS``.

A method says which modules train in which optimizer group, how often each group updates, and the
loss of each group at a step. The training loop (``components.training``) owns everything else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from components.ema import EMAConfig
from components.few_step import backward_simulated_x0, simulated_step, step_grid
from components.generation import one_step_x0
from components.student import StudentConfig, student_network
from components.teacher import TextConditioning


@dataclass
class Batch:
    """One training batch: prompt embeddings, generator noise and, for pair methods, the teacher's
    sample ``x1`` of each noise ``z`` (same prompt), with the CFG scale each ``x1`` was sampled
    at when the pair cache drew one per pair."""

    cond: TextConditioning  # (B, L, D)
    uncond: TextConditioning  # (B, L, D), the empty prompt
    z: torch.Tensor  # (B, C, h, w)
    generator: torch.Generator  # per-step randomness, so a resumed run repeats exactly
    step: int = 0  # the iteration this batch belongs to (methods with phases read it)
    x1: torch.Tensor | None = None  # (B, C, h, w) teacher ODE sample from z, pair methods only
    x1_guidance: torch.Tensor | None = None  # (B,) the CFG scale of each x1 (per-pair caches)

    def rows(self, sl: slice) -> Batch:
        """A micro-batch: the rows ``sl`` of every per-sample field."""
        def part(x):
            return None if x is None else x[sl]
        return Batch(self.cond.rows(sl), self.uncond.rows(sl), self.z[sl], self.generator,
                     self.step, part(self.x1), part(self.x1_guidance))


@dataclass
class Teacher:
    """What a method is built from: the frozen teacher network behind the ``Denoiser`` protocol
    (``network(x_t, t, cond, timestep_cond=None)``, with ``.schedule`` and ``.prediction_type``),
    and optionally the latent decoder (latents → images in [-1, 1]) for image-space losses;
    ``student`` says what the student trains (``distill.student``: full weights or a LoRA)."""

    network: torch.nn.Module
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    student: StudentConfig = field(default_factory=StudentConfig)

    @property
    def schedule(self):
        return self.network.schedule

    def trainable_copy(self) -> torch.nn.Module:
        """A full copy of the teacher network that trains (student or fake score init)."""
        return copy.deepcopy(self.network).train().requires_grad_(True)

    def student_copy(self) -> torch.nn.Module:
        """The student's network: a full trainable copy, or a frozen copy with trainable LoRA
        adapters (``components.student``)."""
        return student_network(self.network, self.student)

    def frozen_copy(self) -> torch.nn.Module:
        return copy.deepcopy(self.network).eval().requires_grad_(False)


@dataclass(frozen=True)
class GroupSpec:
    """An update group: its name, its update period (iterations), its grad-norm clip, the
    iterations ``[start, stop)`` it is active in (methods with phases, e.g. reflow then distill)
    and a linear learning-rate warm-up over its first ``warmup`` updates.

    ``optimizer`` names the optimizer that steps it (default: the group's own); groups that train
    the same network in different phases share one, so each trained network has one optimizer
    state. ``fresh_batch``: the group draws its own batch (prompts and noise) of the iteration
    instead of sharing the first group's (SiD-LSG's generator step does).
    """

    name: str
    every: int = 1
    max_grad_norm: float | None = None
    start: int = 0
    stop: int | None = None
    warmup: int = 0
    optimizer: str = ""
    fresh_batch: bool = False

    @property
    def optimizer_name(self) -> str:
        return self.optimizer or self.name

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
    """What the training loop needs of a method.

    Phases: at each iteration in ``phase_starts`` the loop loads the student's EMA weights into
    the student, calls ``begin_phase(step)`` (where a method freezes the teacher of the new phase
    from the student), restarts the EMA at those weights and gives the student's optimizer a
    fresh state: each phase is a new run that starts where the previous one's average ended
    (InstaFlow's distillation from the 2-RF, every halving round of progressive distillation).
    """

    groups: tuple[GroupSpec, ...]  # in update order within an iteration
    student_groups: tuple[str, ...]  # the groups that update the student (the EMA ticks on them)
    phase_starts: tuple[int, ...]  # iterations where a new phase begins (empty: one phase)
    ema: EMAConfig  # the student's EMA schedule
    spec: Any  # components.generation.GeneratorSpec: how the student generates
    needs_pairs: bool  # batches must carry the teacher's ODE sample x1 of each z

    def parameters(self, group: str) -> list[torch.nn.Parameter]: ...

    def make_optimizer(self, name: str) -> torch.optim.Optimizer:
        """A fresh optimizer of the groups whose ``optimizer_name`` is ``name``."""
        ...

    def begin_phase(self, step: int) -> None:
        """Set up the phase starting at iteration ``step`` (after the EMA is in the student)."""
        ...

    def loss(self, group: str, batch: Batch, scratch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of ``group``; ``scratch`` carries values between groups of one iteration."""
        ...

    def student(self) -> torch.nn.Module:
        """The generator network as a ``Denoiser`` module (what EMA tracks and what is saved)."""
        ...

    def state_modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose trainable weights a checkpoint must hold."""
        ...


def student_x0(network: torch.nn.Module, batch: Batch, spec: Any,
               cond: TextConditioning | None = None) -> torch.Tensor:
    """The student's x̂0 (B, C, h, w) that a score method's losses are applied to, under
    ``cond`` (default: the batch's prompts): G(z) of a one-step generator, or, for an N-step
    one, its x̂0 at the step the iteration trains, the input simulated by the student itself
    (DMD2's backward simulation, arXiv:2405.14867 §4.4; ``components.few_step``)."""
    cond = batch.cond if cond is None else cond
    if spec.steps == 1:
        return one_step_x0(network, batch.z, cond, spec)
    gen = batch.generator
    grid = step_grid(network.schedule.num_timesteps, spec.steps)
    return backward_simulated_x0(network, batch.z, cond, grid,
                                 simulated_step(batch.step, spec.steps),
                                 lambda x: torch.randn(x.shape, generator=gen).to(x))


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` that train (a LoRA student's adapters, or all of them)."""
    return [p for p in module.parameters() if p.requires_grad]


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


def lora_unsupported(name: str) -> str | None:
    """Why method ``name`` cannot train a LoRA student (its class's ``lora_unsupported``), or
    ``None`` when it can."""
    import typing

    _, build = get_method(name)
    return getattr(typing.get_type_hints(build)["return"], "lora_unsupported", None)


def teacher_unsupported(name: str, cfg: Any, traits: dict) -> str | None:
    """Why method ``name`` with config ``cfg`` cannot apply to a teacher of ``traits``
    (``components.networks.folder_traits``: its family, whether its guidance is an input), from
    its class's ``teacher_unsupported``; ``None`` when it can."""
    import typing

    _, build = get_method(name)
    check = getattr(typing.get_type_hints(build)["return"], "teacher_unsupported", None)
    return None if check is None else check(cfg, traits)


def pair_guidance_range(name: str, cfg: Any = None) -> tuple[float, float] | None:
    """The CFG scales over which method ``name`` wants its pairs sampled, one scale per pair
    (its config's ``pair_guidance_range()``), or ``None`` for pairs at one fixed scale."""
    cfg_cls, _ = get_method(name)
    wants = getattr(cfg_cls, "pair_guidance_range", None)
    if wants is None:
        return None
    return wants(cfg if cfg is not None else cfg_cls())


def _load_all() -> None:
    from components.methods import (  # noqa: F401
        dmd2,
        instaflow,
        meng,
        sid_lsg,
        swiftbrush,
    )


