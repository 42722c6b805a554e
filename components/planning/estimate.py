"""From traced iterations to a plan: memory per GPU, time, GPU-hours and what would make it fit.

Memory on each GPU is the traced peak (``components.planning.trace``) plus what a CUDA run adds:
- under FSDP2 (more than one GPU) the gathered parameters of the units in flight: the root unit
  (parameters outside every block, kept gathered), two blocks (the one computing and the one
  prefetched) in the compute dtype, and one block's unsharded fp32 gradients before their
  reduce-scatter;
- ``ALLOCATOR`` × (activations + temporaries): the caching allocator's block rounding and
  fragmentation of the short-lived tensors;
- ``CUDA_CONTEXT_GIB``: the CUDA context, cuBLAS and cuDNN workspaces, NCCL buffers.
A plan fits when that total leaves ``HEADROOM`` of the GPU's memory free.

Memory grows linearly with the micro-batch (activations do; the state does not): two traces,
at micro-batches b1 < b2, give the line, and the largest micro-batch that fits follows.
FLOPs per image are the same at any micro-batch; an iteration's FLOPs weight each group's update
by how often it runs over the whole run (DMD2's generator every tenth iteration, InstaFlow's
phases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from components.planning.gpus import GPU
from components.planning.trace import KINDS, Trace

GIB = 2**30
ALLOCATOR = 0.10
CUDA_CONTEXT_GIB = 1.0
HEADROOM = 0.10


@dataclass(frozen=True)
class RunShape:
    """The run the plan is for: the global batch per iteration, how many GPUs (FSDP2 sharding
    when more than one), the iterations, and the compute dtype's bytes per parameter."""

    global_batch: int
    gpus: int
    steps: int
    bf16: bool


def memory(trace: Trace, gpus: int, bf16: bool) -> dict[str, float]:
    """Bytes per GPU by kind at the traced micro-batch, with the allowances (see module doc)."""
    peak = trace.peaks[gpus]
    out = {k: float(peak[k]) for k in KINDS}
    unit, root = trace.block_params
    compute = 0.5 if bf16 else 1.0  # fp32 master weights gathered as bf16 under bf16
    out["fsdp_buffers"] = (root + 2 * unit) * compute + unit if gpus > 1 else 0.0
    out["allocator"] = ALLOCATOR * (out["activations"] + out["temporaries"])
    out["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    out["total"] = sum(out.values())
    return out


def memory_line(t1: Trace, t2: Trace, gpus: int, bf16: bool) -> tuple[float, float]:
    """(bytes at micro-batch 0, bytes per image) of the total on one GPU."""
    m1, m2 = memory(t1, gpus, bf16)["total"], memory(t2, gpus, bf16)["total"]
    slope = max(0.0, (m2 - m1) / (t2.micro_batch - t1.micro_batch))
    return m1 - slope * t1.micro_batch, slope


def usable_bytes(gpu_memory_gib: float) -> float:
    return gpu_memory_gib * GIB * (1.0 - HEADROOM)


def largest_micro_batch(t1: Trace, t2: Trace, gpus: int, bf16: bool,
                        gpu_memory_gib: float, resident: float = 0.0) -> int:
    """The largest micro-batch per GPU whose planned memory fits (0: not even one image).

    Each traced operator's memory is linear in the micro-batch (its activations are, the state
    is not), so the peak at micro-batch b is the largest of those lines at b: the peak may move
    (from the optimizer step to a backward) as b grows. Without matching traces (the same
    operators in the same order: a branch on a random draw, e.g. a dropped prompt, runs other
    operators at another micro-batch), the line through the two peaks. ``resident``: bytes held
    beside training (text encoders encoding on the fly)."""
    extra = memory(t1, gpus, bf16)
    fixed = extra["fsdp_buffers"] + extra["cuda_context"] + resident
    (s1, r1), (s2, r2) = t1.series, t2.series
    if len(s1) != len(s2) or not s1 or t1.ops != t2.ops:
        base, slope = memory_line(t1, t2, gpus, bf16)
        lines = [(base - fixed, slope)]
    else:
        db = t2.micro_batch - t1.micro_batch
        lines = [(a / gpus + b - t1.micro_batch * ((c - a) / gpus + (d - b)) / db,
                  ((c - a) / gpus + (d - b)) / db) for a, b, c, d in zip(s1, r1, s2, r2)]

    def fits(batch: int) -> bool:
        peak = max(base + slope * batch for base, slope in lines)
        act = max(slope for _, slope in lines) * batch
        return peak + fixed + ALLOCATOR * act <= usable_bytes(gpu_memory_gib)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        if hi >= 2**20:
            return hi
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def accumulation(global_batch: int, gpus: int, max_micro: int) -> tuple[int, int] | None:
    """(micro-batch, gradient accumulation) reaching ``global_batch`` on ``gpus`` GPUs with
    micro-batches of at most ``max_micro``; None when the batch cannot be split so."""
    if max_micro < 1 or global_batch % gpus:
        return None
    per_gpu = global_batch // gpus
    for accum in range(math.ceil(per_gpu / max_micro), per_gpu + 1):
        if per_gpu % accum == 0:
            return per_gpu // accum, accum
    return None


def flops_per_image(trace: Trace) -> dict[str, float]:
    """FLOPs per image of the global batch per iteration, by group, weighted by how often each
    group updates over the run."""
    steps = max(trace.run_steps, 1)
    return {g: f / trace.micro_batch * trace.group_updates[g] / steps
            for g, f in trace.group_flops.items()}


def timing(trace: Trace, run: RunShape, gpu: GPU, mode: str, eff: float,
           extra_s: float = 0.0) -> dict[str, float]:
    """Seconds per iteration, images per second (all GPUs) and GPU-hours for the run;
    ``extra_s``: seconds per iteration spent outside the traced iteration (text encoding on
    the fly)."""
    per_image = sum(flops_per_image(trace).values())
    iteration_s = run.global_batch * per_image / (run.gpus * rate(gpu, mode, eff)) + extra_s
    return {"tflop_per_image": per_image / 1e12,
            "tflop_per_iteration": per_image * run.global_batch / 1e12,
            "seconds_per_iteration": iteration_s,
            "images_per_second": run.global_batch / iteration_s,
            "images_per_second_per_gpu": run.global_batch / iteration_s / run.gpus,
            "gpu_hours": iteration_s * run.steps * run.gpus / 3600.0}


def rate(gpu: GPU, mode: str, eff: float) -> float:
    """FLOP/s one GPU sustains."""
    return getattr(gpu, mode) * 1e12 * eff


def gib(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v / GIB, 3) for k, v in values.items()}
