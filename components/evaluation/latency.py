"""Latency of generating one image at batch 1: warm-up runs, then the median of timed repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def measure_latency(generate_one: Callable[[], object], repeats: int = 5,
                    warmup: int = 2) -> dict:
    """Seconds per call of ``generate_one`` (text encoder + UNet + VAE decode, batch 1)."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        generate_one()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate_one()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
            "warmup": warmup}
