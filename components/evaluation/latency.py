"""Latency of generating one image at batch 1: warm-up runs, then the median of timed repeats.

What is timed is one whole call that turns a caption into pixels: text encoder + UNet (every
step) + VAE decode, no safety checker (methods-reference §3.5). On a GPU the clock stops only
after the device has finished (``sync``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

COVERS = "text encoder + UNet (all steps) + VAE decode, batch 1, no safety checker"


def measure_latency(generate_one: Callable[[], object], repeats: int = 5, warmup: int = 2,
                    sync: Callable[[], None] | None = None) -> dict:
    """Seconds per call of ``generate_one``: median and minimum over ``repeats`` timed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be at least 1 and warmup at least 0")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        generate_one()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate_one()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
            "warmup": warmup, "batch": 1, "covers": COVERS}


def device_sync(device: str) -> Callable[[], None]:
    """A function that waits for ``device`` to finish its queued work (a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None
