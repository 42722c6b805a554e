"""The training monitor: flags a run that collapses or diverges while it trains.

It watches what the loop already produces at its logging cadence: the losses (every
``log_every``), and at every sample step (``sample_every``) the proxy FID and simple statistics of
the student's fixed-seed images, ``prompts`` prompts × ``seeds`` seeds each:

- mean brightness (0 black … 1 white) and mean HSV saturation: a student that collapsed to flat
  black, white or grey images leaves ``brightness_range`` / drops under ``min_saturation``;
- diversity across seeds: per prompt, the per-pixel standard deviation over its seeds, averaged;
  mode collapse (every seed gives the same image) shows as a fall under ``min_diversity_ratio``
  of the first sample's value;
- proxy FID: divergence is ``fid_patience`` sample steps in a row above ``(1 + fid_rise)`` × the
  best value so far;
- a non-finite loss is divergence at once.

``action: warn`` reports each new flag through ``report``; ``stop`` raises ``TrainingAlarm``
(reason and step) so the stage, and the orchestrator's task around it, fail with that line;
``off`` watches nothing. The best proxy FID and its step are kept (``best``). A resumed run
rebuilds this state from the rows its earlier segments logged (``replay``), so its checks go on
as if it had never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

ALARM_PREFIX = "training monitor: step "  # how every flag's line starts (``Monitor._flag``)


class TrainingAlarm(ValueError):
    """The monitor stopped the run (``distill.monitor.action: stop``): the reason and step."""

    def __init__(self, message: str, step: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.step, self.reason = step, reason


@dataclass(frozen=True)
class MonitorConfig:
    """``params.yaml: distill.monitor``."""

    action: Literal["off", "warn", "stop"] = "warn"
    prompts: int = 4  # prompts of the fixed-seed monitor images
    seeds: int = 4  # seeds per prompt (diversity across seeds needs at least 2)
    brightness_range: tuple[float, ...] = (0.03, 0.97)
    min_saturation: float = 0.01
    min_diversity_ratio: float = 0.25  # of the first sample step's diversity
    fid_rise: float = 0.5
    fid_patience: int = 2

    def validate(self) -> None:
        if self.prompts < 1 or self.seeds < 2:
            raise ValueError(f"monitor.prompts must be >= 1 and monitor.seeds >= 2 (diversity "
                             f"is measured across seeds), got {self.prompts}, {self.seeds}")
        span = self.brightness_range
        if len(span) != 2 or not 0 <= span[0] < span[1] <= 1:
            raise ValueError(f"monitor.brightness_range must be [low, high] with 0 <= low < "
                             f"high <= 1, got {list(self.brightness_range)}")
        if not 0 <= self.min_diversity_ratio < 1 or self.fid_rise <= 0 or self.fid_patience < 1:
            raise ValueError("monitor needs 0 <= min_diversity_ratio < 1, fid_rise > 0 and "
                             "fid_patience >= 1")


def image_statistics(images: np.ndarray, prompts: int) -> dict[str, float]:
    """Brightness, saturation and diversity of uint8 images (N, H, W, 3) where image i shows
    prompt ``i % prompts`` (N a multiple of ``prompts``, at least two seeds each)."""
    x = images.astype(np.float64) / 255.0
    high, low = x.max(axis=-1), x.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0)
    groups = x.reshape(-1, prompts, *x.shape[1:])  # (seeds, prompts, H, W, 3)
    return {"monitor_brightness": float(x.mean()), "monitor_saturation": float(saturation.mean()),
            "monitor_diversity": float(groups.std(axis=0).mean())}


class Monitor:
    """Stateful checks over the run's metric stream; see the module docstring."""

    def __init__(self, cfg: MonitorConfig, report: Callable[[str], None] = print):
        self.cfg, self.report = cfg, report
        self.first_diversity: float | None = None
        self.best: tuple[float, int] | None = None  # (proxy FID, step)
        self.fid_strikes = 0
        self.flags: list[tuple[int, str]] = []  # every (step, reason) raised so far
        self._quiet = False  # replaying: record flags, report and raise nothing

    @property
    def enabled(self) -> bool:
        return self.cfg.action != "off"

    def replay(self, rows: list[dict]) -> None:
        """Rebuild the state from a run's earlier rows (the loop's loss windows and the sample
        rows, in step order): the first diversity, the best proxy FID, the strikes and the
        flags, without reporting or stopping again."""
        if not self.enabled:
            return
        self._quiet = True
        try:
            for row in rows:
                step = int(row["step"])
                if any(k.startswith("monitor_") or k == "proxy_fid" for k in row):
                    self.observe_samples(row, step)
                else:
                    self.observe_losses(row, step)
        finally:
            self._quiet = False

    def records(self) -> list[dict]:
        """Every flag so far as ``{"step", "reason"}`` rows (what the stage writes and logs)."""
        return [{"step": step, "reason": reason} for step, reason in self.flags]

    def observe_losses(self, metrics: dict[str, float], step: int) -> None:
        """The loss window the loop logs at ``step``."""
        if not self.enabled:
            return
        bad = sorted(k for k, v in metrics.items() if k.startswith("loss")
                     and not math.isfinite(v))
        if bad:
            self._flag(step, f"diverged: loss {', '.join(bad)} is not finite")

    def observe_samples(self, stats: dict[str, float], step: int) -> None:
        """Image statistics (``image_statistics``) and ``proxy_fid`` (when measured) at a sample
        step."""
        if not self.enabled:
            return
        for reason in self._image_reasons(stats) + self._fid_reasons(stats.get("proxy_fid"),
                                                                     step):
            self._flag(step, reason)

    def _image_reasons(self, stats: dict[str, float]) -> list[str]:
        cfg, out = self.cfg, []
        low, high = cfg.brightness_range
        brightness = stats.get("monitor_brightness")
        if brightness is not None and not low <= brightness <= high:
            out.append(f"collapsed: mean brightness {brightness:.3f} is outside [{low}, {high}] "
                       "(flat black or white images)")
        saturation = stats.get("monitor_saturation")
        if saturation is not None and saturation < cfg.min_saturation:
            out.append(f"collapsed: mean saturation {saturation:.4f} < {cfg.min_saturation} "
                       "(grey images)")
        diversity = stats.get("monitor_diversity")
        if diversity is not None:
            if self.first_diversity is None:
                self.first_diversity = diversity
            elif diversity < cfg.min_diversity_ratio * self.first_diversity:
                out.append(f"mode collapse: diversity across seeds {diversity:.4f} is "
                           f"{diversity / max(self.first_diversity, 1e-12):.0%} of its first "
                           f"value {self.first_diversity:.4f} (min_diversity_ratio "
                           f"{cfg.min_diversity_ratio})")
        return out

    def _fid_reasons(self, fid: float | None, step: int) -> list[str]:
        if fid is None:
            return []
        if not math.isfinite(fid):
            return [f"diverged: proxy FID is {fid}"]
        if self.best is None or fid < self.best[0]:
            self.best, self.fid_strikes = (fid, step), 0
            return []
        limit = (1 + self.cfg.fid_rise) * self.best[0]
        self.fid_strikes = self.fid_strikes + 1 if fid > limit else 0
        if self.fid_strikes < self.cfg.fid_patience:
            return []
        reason = (f"diverged: proxy FID {fid:.2f} above {limit:.2f} (1 + fid_rise "
                  f"{self.cfg.fid_rise} times the best {self.best[0]:.2f} at step "
                  f"{self.best[1]}) for {self.fid_strikes} sample steps")
        return [reason]

    def _flag(self, step: int, reason: str) -> None:
        self.flags.append((step, reason))
        if self._quiet:
            return
        message = f"{ALARM_PREFIX}{step}: {reason}"
        if self.cfg.action == "stop":
            raise TrainingAlarm(f"{message}; the run stopped (distill.monitor.action: stop)",
                                step, reason)
        self.report(f"{message} (distill.monitor.action: warn)")
