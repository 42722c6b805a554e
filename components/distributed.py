"""Processes of a training job (``torchrun``; NCCL on GPUs, gloo on CPUs) and their batch rows.

The training loop's batch is the *global* batch. Every process makes the same draws of the global
batch from the step's generator, reads only its own rows from the caches, and splits them into
``grad_accum`` micro-batches; the global micro-batch ``m`` (of ``world_size * grad_accum``) always
covers the same rows and carries its own generator, so what a micro-batch computes does not
depend on which process runs it.
Gradients are reduced by FSDP2 (``components.policy``) during the backward of the last
micro-batch; 1 process x 4 micro-batches, 2 x 2 and 4 x 1 give the same update up to float
summation order (``tests/test_distributed.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def context() -> Context:
    """The running job's context; a single process unless a process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    return SINGLE


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> str:
    """Join the process group ``torchrun`` set up (no-op for one process); return this rank's
    device: ``"cuda"`` becomes the process's own GPU (``cuda:LOCAL_RANK``)."""
    if not launched():
        return device
    if device.startswith("cuda"):
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device


def check_processes(processes: int, device: str) -> None:
    """A clear error, before anything loads, when ``processes`` cannot run on ``device``."""
    if processes < 1:
        raise ValueError(f"distill.processes must be >= 1, got {processes}")
    if device.startswith("cuda") and processes > 1:
        visible = torch.cuda.device_count()
        if processes > visible:
            raise ValueError(f"distill.processes is {processes} but {visible} GPU(s) are "
                             "visible; set distill.processes to at most the GPU count (or "
                             "CUDA_VISIBLE_DEVICES)")


def device_mesh(device: torch.device):
    """The 1-D mesh of every process, on ``device``'s type (FSDP2 shards over it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (context().world_size,))


def barrier() -> None:
    if context().world_size > 1:
        dist.barrier()


def local_rows(batch_size: int, ctx: Context) -> slice:
    """The rows of a global batch that process ``ctx.rank`` trains on."""
    if batch_size % ctx.world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {ctx.world_size} "
                         f"processes; make the global batch a multiple of the process count")
    n = batch_size // ctx.world_size
    return slice(ctx.rank * n, (ctx.rank + 1) * n)


def micro_generators(gen: torch.Generator, parts: int, ctx: Context) -> list[torch.Generator]:
    """This process's generators of the global micro-batches ``rank * parts ... + parts - 1``.

    The base seed is drawn from the step generator, identically on every process.
    """
    base = int(torch.randint(0, 2**62, (1,), generator=gen))
    first = ctx.rank * parts
    return [torch.Generator().manual_seed(base + first + k) for k in range(parts)]


def reduce_metrics(metrics: dict, summed: Iterable[str] = ()) -> dict:
    """Metrics averaged over processes (``summed`` keys added up), for logging on rank 0."""
    ctx = context()
    if ctx.world_size == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    summed = set(summed)
    return {k: (v if k in summed else v / ctx.world_size)
            for k, v in zip(keys, values.tolist())}


def finish() -> None:
    """Wait for every process, then leave the process group (no-op for one process)."""
    if context().world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
