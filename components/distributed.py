"""Data-parallel training across processes (``torchrun`` / ``accelerate launch``; NCCL or gloo).

The training loop's batch is the *global* batch. Every process draws the same global batch from
the step's generator, keeps its own rows, and splits them into ``grad_accum`` micro-batches; the
global micro-batch ``m`` (of ``world_size * grad_accum``) always covers the same rows and carries
its own generator, so what a micro-batch computes does not depend on which process runs it.
Gradients are summed across processes once per optimizer step, after accumulation (the pattern
DDP follows under ``no_sync``). Methods own their forward calls, so their modules are not wrapped
in ``DistributedDataParallel``; the all-reduce acts on the gradients of each group's parameters.
Then 1 process × 4 micro-batches, 2 × 2 and 4 × 1 give the same update up to float summation
order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
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
    """Whether this process was started by ``torchrun`` / ``accelerate launch`` with >1 process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> str:
    """Join the process group a launcher set up (no-op for one process); return this rank's device.

    Uses ``accelerate``'s ``PartialState`` (NCCL on CUDA, gloo on CPU); ``device="cuda"`` becomes
    the process's own GPU (``cuda:LOCAL_RANK``).
    """
    if not launched():
        return device
    from accelerate import PartialState

    state = PartialState(cpu=not device.startswith("cuda"))
    return str(state.device) if device.startswith("cuda") else device


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


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over processes, as one flat buffer per dtype and device.

    A process whose micro-batches produced no gradient (all samples non-finite) contributes zeros,
    so every process always joins the collective.
    """
    ctx = context()
    if ctx.world_size == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: Iterable[torch.Tensor], cap: int = 2**26) -> list[list[torch.Tensor]]:
    """Group tensors by (dtype, device) into buckets of at most ``cap`` elements (256 MB fp32)."""
    out: list[list[torch.Tensor]] = []
    open_: dict = {}  # (dtype, device) -> [bucket, its element count]
    for g in grads:
        key = (g.dtype, g.device)
        entry = open_.get(key)
        if entry is None or entry[1] + g.numel() > cap:
            entry = open_[key] = [[], 0]
            out.append(entry[0])
        entry[0].append(g)
        entry[1] += g.numel()
    return out


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


def broadcast_modules(modules: Iterable[torch.nn.Module]) -> None:
    """Copy rank 0's parameters and buffers to every process (as DDP does when it wraps a model),
    so randomly initialized parts (e.g. LoRA A matrices) start identical everywhere."""
    if context().world_size == 1:
        return
    seen: set[int] = set()
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                dist.broadcast(t.data, src=0)
