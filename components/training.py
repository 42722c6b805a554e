"""The method-agnostic distillation loop.

It owns optimizers (one per method group), the update ratio of each group, gradient accumulation,
per-sample NaN filtering, gradient clipping, EMA of the student, checkpoint/resume
(``components.checkpoint``), logging, and the precision / sharding policy (``components.policy``).
All randomness of iteration ``k`` comes from a generator seeded with ``(seed, k)``, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from components import distributed
from components.checkpoint import (  # noqa: F401  (re-exported for the stage and methods)
    checkpoint_step,
    checkpoint_weights,
    load_checkpoint,
    save_checkpoint,
)
from components.methods import Batch, Method
from components.policy import TrainingPolicy

LogFn = Callable[[dict, int], None]
BatchSource = Callable[[int, torch.Generator, int], Batch]


@dataclass(frozen=True)
class LoopConfig:
    """Loop settings shared by every method (part of ``params.yaml: distill``)."""

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 10
    sample_every: int = 100
    checkpoint_every: int = 100

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every", "sample_every",
                    "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got "
                                 f"{getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum "
                             f"{self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")


class EMA:
    """Exponential moving average of a module's floating-point parameters."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def split_batch(batch: Batch, parts: int,
                ctx: distributed.Context = distributed.SINGLE) -> list[Batch]:
    """This process's ``parts`` micro-batches of the global ``batch``, each with its own generator
    (see ``components.distributed``); a single micro-batch keeps the step's generator."""
    if parts * ctx.world_size == 1:
        return [batch]
    rows = distributed.local_rows(batch.z.shape[0], ctx)
    n, rest = divmod(rows.stop - rows.start, parts)
    if rest:
        raise ValueError(f"the per-process batch {rows.stop - rows.start} is not divisible by "
                         f"grad_accum {parts}")
    out = []
    for k, gen in enumerate(distributed.micro_generators(batch.generator, parts, ctx)):
        mb = batch.rows(slice(rows.start + k * n, rows.start + (k + 1) * n))
        mb.generator = gen
        out.append(mb)
    return out


def update_group(method: Method, group, opt: torch.optim.Optimizer, micro: list[Batch],
                 scratch: list[dict], batch_size: int,
                 policy: TrainingPolicy | None = None) -> dict:
    """Accumulate the group's loss over micro-batches, drop non-finite samples, clip, step.

    Each process's loss is its samples' sum over its share of the global batch; FSDP2 averages
    the gradients over processes, so micro-batches and processes together give the gradient of
    the global batch's mean. Metrics stay tensors (no host sync); the loop converts them when it
    logs.
    """
    opt.zero_grad(set_to_none=True)
    share = batch_size / distributed.context().world_size
    metrics: dict = {}
    dropped = 0
    for k, (mb, sc) in enumerate(zip(micro, scratch)):
        if policy is not None:
            policy.gradient_sync(method, k == len(micro) - 1)
        compute = policy.autocast(mb.z.device) if policy else contextlib.nullcontext()
        with compute:
            per_sample, m = method.loss(group.name, mb, sc)
        finite = torch.isfinite(per_sample)
        dropped = dropped + (~finite).sum()
        # every process always runs the backward (no data-dependent branch): a dropped sample
        # contributes zero, and gradient reduction is joined by every process
        (torch.where(finite, per_sample, 0.0).sum() / share).backward()
        for key, v in m.items():
            metrics[key] = metrics.get(key, 0.0) + v / len(micro)
    params = method.parameters(group.name)
    metrics[f"dropped_{group.name}"] = dropped
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if group.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, group.max_grad_norm)
        metrics[f"grad_norm_{group.name}"] = norm
    for pg in opt.param_groups:
        pg["lr"] = pg.setdefault("initial_lr", pg["lr"]) * group.lr_factor(micro[0].step)
    opt.step()
    return metrics


def host_metrics(metrics: dict) -> dict[str, float]:
    """Metrics as floats, averaged over processes (``dropped_*`` summed): one host sync per
    log. ``meta`` tensors have no values and log as NaN."""
    out = {}
    for key, value in metrics.items():
        if torch.is_tensor(value):
            full = getattr(value, "full_tensor", None)
            value = full() if full else value
            value = float("nan") if value.device.type == "meta" else float(value)
        out[key] = float(value)
    return distributed.reduce_metrics(out, summed=[k for k in out if k.startswith("dropped_")])


def train(method: Method, batches: BatchSource, cfg: LoopConfig, ckpt_dir: Path, log: LogFn,
          on_sample: Callable[[torch.nn.Module, int], None],
          progress: Callable[[int, int], None] | None = None,
          policy: TrainingPolicy | None = None) -> EMA:
    """Run ``cfg.steps`` iterations (resuming from ``ckpt_dir``); return the student's EMA.

    ``batches(batch_size, generator, step)`` draws iteration ``step``'s batch (prompts, or teacher
    pairs) from that iteration's generator (``components.batches``). Under torchrun the batch is
    global and each process takes its rows (``components.distributed``); ``policy`` sets
    precision, checkpointing and FSDP2 sharding (``components.policy``). Every process runs
    the loop; rank 0 logs and samples, all write their checkpoint shards.
    """
    ctx = distributed.context()
    policy = policy or TrainingPolicy()
    opts = policy.prepare(method)
    ema = EMA(method.student(), cfg.ema_decay)
    start = load_checkpoint(ckpt_dir, method, opts, ema)
    for step in range(start, cfg.steps):
        gen = step_generator(cfg.seed, step)
        batch = batches(cfg.batch_size, gen, step)
        micro = split_batch(batch, cfg.grad_accum, ctx)
        scratch: list[dict] = [{} for _ in micro]
        metrics: dict = {}
        for group in method.groups:
            if group.active(step):
                metrics.update(update_group(method, group, opts[group.name], micro, scratch,
                                            cfg.batch_size, policy))
        ema.update(method.student())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = host_metrics(metrics)  # a collective under torchrun
            if ctx.is_main:
                log(metrics, done)
        if done % cfg.sample_every == 0 or done == cfg.steps:
            student = policy.full_module(method.student())  # gathered on rank 0
            if ctx.is_main:
                on_sample(student, done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt_dir, method, opts, ema, done)
        if progress and ctx.is_main:
            progress(done, cfg.steps)
    return ema
