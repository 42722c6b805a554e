"""The method-agnostic distillation loop.

It owns optimizers (one per trained network), the update ratio and phases of each group, gradient
accumulation, per-sample NaN filtering, gradient clipping, the student's EMA (``components.ema``),
checkpoint/resume (``components.checkpoint``), logging, and the precision / sharding policy
(``components.policy``). All randomness of iteration ``k`` comes from a generator seeded with
``(seed, k)``, so a run resumed from a checkpoint continues exactly as the uninterrupted run
would have.

Non-finite samples. A sample whose loss is not finite is left out of the loss, so it adds no
gradient of its own. That does not isolate it: its NaN activations still meet a zero upstream
gradient inside the shared backward (0 × NaN = NaN), so every gradient entry such a path reaches
becomes NaN, and those entries are then zeroed for the whole batch (``nan_to_num``) before the
step. The official SiD-LSG loop does exactly this (it drops NaN samples by indexing, then
``nan_to_num``s the gradients); ``dropped_<group>`` counts the samples left out.
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
from components.ema import EMA
from components.methods import Batch, GroupSpec, Method
from components.monitor import Monitor
from components.policy import TrainingPolicy

LogFn = Callable[[dict, int], None]
# batches(batch_size, generator, step) -> the global batch; under several processes the loop
# passes ``rows=`` (this process's slice of it) and the source reads only those rows
BatchSource = Callable[..., Batch]


@dataclass(frozen=True)
class LoopConfig:
    """Loop settings shared by every method (part of ``params.yaml: distill``); the student's EMA
    schedule is a method setting (``distill.methods.<name>.ema``)."""

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
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


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def draw_batch(batches: BatchSource, batch_size: int, gen: torch.Generator, step: int,
               ctx: distributed.Context = distributed.SINGLE) -> Batch:
    """This process's rows of iteration ``step``'s global batch. Every process draws the whole
    batch's indices and noise from ``gen`` (the same on all), but reads only its own rows from
    the caches (``rows=``, see ``components.batches``)."""
    if ctx.world_size == 1:
        return batches(batch_size, gen, step)
    return batches(batch_size, gen, step, rows=distributed.local_rows(batch_size, ctx))


def split_batch(batch: Batch, parts: int,
                ctx: distributed.Context = distributed.SINGLE) -> list[Batch]:
    """This process's batch (its rows of the global batch, ``draw_batch``) as ``parts``
    micro-batches, each with its own generator (see ``components.distributed``); a single
    micro-batch keeps the step's generator."""
    if parts * ctx.world_size == 1:
        return [batch]
    n, rest = divmod(batch.z.shape[0], parts)
    if rest:
        raise ValueError(f"the per-process batch {batch.z.shape[0]} is not divisible by "
                         f"grad_accum {parts}")
    out = []
    for k, gen in enumerate(distributed.micro_generators(batch.generator, parts, ctx)):
        mb = batch.rows(slice(k * n, (k + 1) * n))
        mb.generator = gen
        out.append(mb)
    return out


def update_group(method: Method, group: GroupSpec, opt: torch.optim.Optimizer,
                 micro: list[Batch], scratch: list[dict], batch_size: int,
                 policy: TrainingPolicy | None = None) -> dict:
    """Accumulate the group's loss over micro-batches, drop non-finite samples, clip, step,
    and free the gradients.

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
            metrics[key] = metrics.get(key, 0.0) + _detached(v) / len(micro)
    params = method.parameters(group.name)
    metrics[f"dropped_{group.name}"] = dropped
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if group.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, group.max_grad_norm)
        metrics[f"grad_norm_{group.name}"] = norm.detach()
    for pg in opt.param_groups:
        pg["lr"] = pg.setdefault("initial_lr", pg["lr"]) * group.lr_factor(micro[0].step)
    opt.step()
    # free the gradients now, not at the group's next update: the other groups' forward and
    # backward passes run without them (on SDXL DMD2, one UNet's 9.6 GiB in fp32)
    opt.zero_grad(set_to_none=True)
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


def _detached(v):
    return v.detach() if torch.is_tensor(v) else v


def student_updates(method: Method, step: int) -> int:
    """How many times the student was updated in the current phase, in iterations before
    ``step`` (what the EMA schedule counts)."""
    start = max((b for b in method.phase_starts if b < step), default=0)
    return sum(g.updates_before(step) - g.updates_before(start) for g in method.groups
               if g.name in method.student_groups)


class MetricWindow:
    """Means of each metric over the iterations since the last log, so a group that did not run
    in the logged iteration (DMD2's generator under TTUR) is still reported."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self) -> dict:
        """The window's means as floats (one host sync per log), reduced over processes;
        ``dropped_*`` counts are totals over the window and the processes. A collective under
        torchrun: every process calls it."""
        out = {k: v if k.startswith("dropped_") else v / self.counts[k]
               for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return host_metrics(out)


def _begin_phase(method: Method, step: int, ema: EMA, opts: dict,
                 policy: TrainingPolicy) -> None:
    """A new phase: the student continues from its average, the method sets up the phase, the
    average restarts and the student's optimizer starts fresh (see ``Method``)."""
    student = method.student()
    ema.copy_to(student)
    method.begin_phase(step)
    ema.reset(student)
    for name in {g.optimizer_name for g in method.groups if g.name in method.student_groups}:
        opts[name] = policy.make_optimizer(method, name)


def iteration(method: Method, step: int, batches: BatchSource, cfg: LoopConfig, opts: dict,
              ema: EMA, policy: TrainingPolicy) -> list[dict]:
    """Iteration ``step`` of the loop: a phase start where one begins, each active group's
    update in the method's order, then the EMA update; returns each group's metrics."""
    ctx = distributed.context()
    if step in method.phase_starts and step > 0:
        _begin_phase(method, step, ema, opts, policy)
    gen = step_generator(cfg.seed, step)
    micro = split_batch(draw_batch(batches, cfg.batch_size, gen, step, ctx), cfg.grad_accum, ctx)
    scratch: list[dict] = [{} for _ in micro]
    out = []
    student_updated = False
    for group in method.groups:
        if not group.active(step):
            continue
        if group.fresh_batch:
            micro = split_batch(draw_batch(batches, cfg.batch_size, gen, step, ctx),
                                cfg.grad_accum, ctx)
        out.append(update_group(method, group, opts[group.optimizer_name], micro, scratch,
                                cfg.batch_size, policy))
        student_updated |= group.name in method.student_groups
    if student_updated:
        ema.update(method.student(), student_updates(method, step + 1))
    return out


def train(method: Method, batches: BatchSource, cfg: LoopConfig, ckpt_dir: Path, log: LogFn,
          on_sample: Callable[[torch.nn.Module, int], dict | None],
          progress: Callable[[int, int], None] | None = None,
          policy: TrainingPolicy | None = None, monitor: Monitor | None = None) -> EMA:
    """Run ``cfg.steps`` iterations (resuming from ``ckpt_dir``); return the student's EMA.

    ``batches(batch_size, generator, step)`` draws iteration ``step``'s batch (prompts, or teacher
    pairs) from that iteration's generator (``components.batches``); a group with
    ``fresh_batch`` draws another one after it. Under torchrun the batch is global and each
    process reads only its rows (``draw_batch``, ``components.distributed``); ``policy`` sets
    precision, checkpointing and FSDP2 sharding (``components.policy``). Every process runs the
    loop; rank 0 logs and samples, all write their checkpoint shards. ``on_sample`` gets the
    student with its EMA weights (what is saved) and may return statistics of its samples;
    ``monitor`` (``components.monitor``) checks those and every logged loss window, and stops the
    run by raising when it is set to.
    """
    ctx = distributed.context()
    policy = policy or TrainingPolicy()
    opts = policy.prepare(method)
    ema = EMA(method.student(), method.ema, cfg.batch_size)
    start = load_checkpoint(ckpt_dir, method, opts, ema)
    window = MetricWindow()
    for step in range(start, cfg.steps):
        for metrics in iteration(method, step, batches, cfg, opts, ema, policy):
            window.add(metrics)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.flush()  # a collective under torchrun
            if ctx.is_main:
                log(metrics, done)
                if monitor is not None:
                    monitor.observe_losses(metrics, done)
        if done % cfg.sample_every == 0 or done == cfg.steps:
            with ema.applied(method.student()) as averaged:
                student = policy.full_module(averaged)  # gathered on rank 0
                stats = on_sample(student, done) if ctx.is_main else None
            if monitor is not None and stats:
                monitor.observe_samples(stats, done)  # under torchrun a stop ends every process
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt_dir, method, opts, ema, done)
        if progress and ctx.is_main:
            progress(done, cfg.steps)
    return ema
