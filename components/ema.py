"""Exponential moving averages of the student's weights, with the schedules the official codes use.

An EMA update after the student's n-th optimizer update (n = 1, 2, … counted from the start of
the current phase) is ``shadow ← β_n shadow + (1 − β_n) θ`` with β_n by ``kind``:

- ``constant``: β_n = ``decay``.
- ``warmup`` (diffusers' ``EMAModel`` with its defaults, which SwiftBrush's ``--use_ema`` uses):
  with s = n − 1, β_n = 0 for s = 0 (the first update copies the weights), else
  β_n = min(``decay``, (1 + s) / (10 + s)).
- ``halflife`` (EDM, which SiD-LSG's ``--ema`` follows): the half-life in images is
  h = 1000 · ``halflife_kimg``, capped at ``rampup`` · (images seen before this update) when
  ``rampup`` is set; β_n = 0.5 ** (B / max(h, 1e-8)) for B images per update.
- ``none`` (DMD2): no average is kept; the saved student is the raw weights.

The count n is derived from the iteration (``components.training.student_updates``), not stored,
so a resumed run continues the same schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

EMAKind = Literal["constant", "warmup", "halflife", "none"]


@dataclass(frozen=True)
class EMAConfig:
    """An EMA schedule (a method's ``ema`` key; each method's default is its published one)."""

    kind: EMAKind = "constant"
    decay: float = 0.9999  # constant: β; warmup: the cap on β
    halflife_kimg: float = 50.0  # halflife: thousands of images
    rampup: float | None = 0.05  # halflife: cap the half-life at this fraction of images seen

    def validate(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")
        if self.halflife_kimg <= 0:
            raise ValueError(f"ema.halflife_kimg must be positive, got {self.halflife_kimg}")
        if self.rampup is not None and self.rampup <= 0:
            raise ValueError(f"ema.rampup must be positive or null, got {self.rampup}")

    def beta(self, n: int, batch_size: int) -> float:
        """β of the EMA update after the student's ``n``-th update (n ≥ 1) of ``batch_size``
        images."""
        if self.kind == "constant":
            return self.decay
        if self.kind == "warmup":
            s = n - 1
            return 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))
        if self.kind == "halflife":
            h = self.halflife_kimg * 1000.0
            if self.rampup is not None:
                h = min(h, (n - 1) * batch_size * self.rampup)
            return 0.5 ** (batch_size / max(h, 1e-8))
        return 0.0


class EMA:
    """The average of a module's state (floating-point entries averaged, the rest copied)."""

    def __init__(self, module: torch.nn.Module, cfg: EMAConfig, batch_size: int):
        self.cfg, self.batch_size = cfg, batch_size
        self.shadow: dict[str, torch.Tensor] | None = None
        self.reset(module)

    @property
    def enabled(self) -> bool:
        return self.cfg.kind != "none"

    def reset(self, module: torch.nn.Module) -> None:
        """Restart the average at the module's current weights (a new phase)."""
        if self.enabled:
            self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, n: int) -> None:
        """The EMA step after the student's ``n``-th update in this phase."""
        if not self.enabled:
            return
        beta = self.cfg.beta(n, self.batch_size)
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.to(self.shadow[k].dtype), 1.0 - beta)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into ``module`` (nothing to do without an average)."""
        if self.enabled:
            module.load_state_dict(self.shadow)

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``module`` with the averaged weights inside the block, its own weights after it."""
        if not self.enabled:
            yield module
            return
        saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            module.load_state_dict(saved)
