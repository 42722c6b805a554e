"""The method-agnostic distillation loop.

It owns optimizers (one per trained network), the update ratio and phases of each group, gradient
accumulation, per-sample NaN filtering, gradient clipping, the student's EMA (``components.ema``),
checkpoint/resume and logging. All randomness of iteration ``k`` comes from a generator seeded
with ``(seed, k)``, so a run resumed from a checkpoint continues exactly as the uninterrupted run
would have.

Non-finite samples. A sample whose loss is not finite is left out of the loss, so it adds no
gradient of its own. That does not isolate it: its NaN activations still meet a zero upstream
gradient inside the shared backward (0 × NaN = NaN), so every gradient entry such a path reaches
becomes NaN, and those entries are then zeroed for the whole batch (``nan_to_num``) before the
step. The official SiD-LSG loop does exactly this (it drops NaN samples by indexing, then
``nan_to_num``s the gradients); ``dropped_<group>`` counts the samples left out.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components import distributed
from components.ema import EMA
from components.methods import Batch, GroupSpec, Method

LogFn = Callable[[dict, int], None]
BatchSource = Callable[[int, torch.Generator, int], Batch]


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


def update_group(method: Method, group: GroupSpec, opt: torch.optim.Optimizer,
                 micro: list[Batch], scratch: list[dict], batch_size: int) -> dict:
    """Accumulate the group's loss over micro-batches, drop non-finite samples, clip, step.

    Metrics stay tensors (no host sync here); the loop reads them at its logging cadence."""
    opt.zero_grad(set_to_none=True)
    metrics: dict = {}
    dropped = 0
    for mb, sc in zip(micro, scratch):
        per_sample, m = method.loss(group.name, mb, sc)
        finite = torch.isfinite(per_sample)
        dropped = dropped + (~finite).sum()
        (torch.where(finite, per_sample, 0.0).sum() / batch_size).backward()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + _detached(v) / len(micro)
    params = method.parameters(group.name)
    distributed.all_reduce_gradients(params)  # sum over processes: the global batch's gradient
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
    return metrics


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
        ``dropped_*`` counts are totals over the window and the processes."""
        totals = [k for k in self.sums if k.startswith("dropped_")]
        out = {k: float(v) / (1 if k in totals else self.counts[k]) for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return distributed.reduce_metrics(out, summed=totals)


def _begin_phase(method: Method, step: int, ema: EMA, opts: dict) -> None:
    """A new phase: the student continues from its average, the method sets up the phase, the
    average restarts and the student's optimizer starts fresh (see ``Method``)."""
    student = method.student()
    ema.copy_to(student)
    method.begin_phase(step)
    ema.reset(student)
    for name in {g.optimizer_name for g in method.groups if g.name in method.student_groups}:
        opts[name] = method.make_optimizer(name)


def train(method: Method, batches: BatchSource, cfg: LoopConfig, ckpt_dir: Path, log: LogFn,
          on_sample: Callable[[torch.nn.Module, int], None],
          progress: Callable[[int, int], None] | None = None) -> EMA:
    """Run ``cfg.steps`` iterations (resuming from ``ckpt_dir``); return the student's EMA.

    ``batches(batch_size, generator, step)`` draws iteration ``step``'s batch (prompts, or teacher
    pairs) from that iteration's generator (``components.batches``); a group with
    ``fresh_batch`` draws another one after it. Under torchrun/accelerate the batch is global and
    each process takes its rows (``components.distributed``). ``on_sample`` gets the student with
    its EMA weights (what is saved).
    """
    ctx = distributed.context()
    distributed.broadcast_modules(method.state_modules().values())
    opts = {name: method.make_optimizer(name)
            for name in dict.fromkeys(g.optimizer_name for g in method.groups)}
    ema = EMA(method.student(), method.ema, cfg.batch_size)
    start = load_checkpoint(ckpt_dir, method, opts, ema)
    window = MetricWindow()
    for step in range(start, cfg.steps):
        if step in method.phase_starts and step > 0:
            _begin_phase(method, step, ema, opts)
        gen = step_generator(cfg.seed, step)
        micro = split_batch(batches(cfg.batch_size, gen, step), cfg.grad_accum, ctx)
        scratch: list[dict] = [{} for _ in micro]
        student_updated = False
        for group in method.groups:
            if not group.active(step):
                continue
            if group.fresh_batch:
                micro = split_batch(batches(cfg.batch_size, gen, step), cfg.grad_accum, ctx)
            window.add(update_group(method, group, opts[group.optimizer_name], micro, scratch,
                                    cfg.batch_size))
            student_updated |= group.name in method.student_groups
        if student_updated:
            ema.update(method.student(), student_updates(method, step + 1))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.flush()  # a collective: every process takes part
            if ctx.is_main:
                log(metrics, done)
        if not ctx.is_main:  # rank 0 samples and checkpoints for the job
            continue
        if done % cfg.sample_every == 0 or done == cfg.steps:
            with ema.applied(method.student()) as student:
                on_sample(student, done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt_dir, method, opts, ema, done)
        if progress:
            progress(done, cfg.steps)
    return ema


def _trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()
            if k in names or not names}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        for key, val in entry.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.contiguous()
            else:
                scalars["state"].setdefault(str(idx), {})[key] = val
    return tensors, scalars


def save_checkpoint(ckpt_dir: Path, method: Method, opts: dict, ema: EMA, step: int) -> None:
    """Write ``ckpt_dir/step-N`` (safetensors + JSON) atomically and point ``latest`` at it."""
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in method.state_modules().items():
        save_file(_trainable_state(module), str(tmp / f"{name}.safetensors"))
    if ema.enabled:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()},
                  str(tmp / "ema.safetensors"))
    meta = {"step": step, "optimizers": {}}
    for name, opt in opts.items():
        tensors, scalars = _optimizer_tensors(opt)
        save_file(tensors, str(tmp / f"optim-{name}.safetensors"))
        meta["optimizers"][name] = scalars
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (ckpt_dir / "latest.tmp").write_text(final.name)
    os.replace(ckpt_dir / "latest.tmp", ckpt_dir / "latest")
    for old in sorted(ckpt_dir.glob("step-*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(ckpt_dir: Path) -> int:
    """The step of the newest complete checkpoint in ``ckpt_dir`` (0 if none)."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return 0
    return int(json.loads((ckpt_dir / pointer.read_text().strip() / "state.json").read_text())[
        "step"])


def checkpoint_weights(path: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The weights of state module ``name`` in a checkpoint (``None`` if it holds none), to
    start another run from: ``path`` is a ``step-N`` folder or a run's checkpoint directory
    (its ``latest``)."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no state.json): give a "
                                "run's checkpoint directory or one of its step-N folders")
    file = path / f"{name}.safetensors"
    return load_file(str(file)) if file.is_file() else None


def load_checkpoint(ckpt_dir: Path, method: Method, opts: dict, ema: EMA) -> int:
    """Restore the newest complete checkpoint; return the step to continue from (0 if none)."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return 0
    src = ckpt_dir / pointer.read_text().strip()
    meta = json.loads((src / "state.json").read_text())
    for name, module in method.state_modules().items():
        module.load_state_dict(load_file(str(src / f"{name}.safetensors")), strict=False)
    if ema.enabled:
        ema.shadow = load_file(str(src / "ema.safetensors"))
    for name, opt in opts.items():
        tensors = load_file(str(src / f"optim-{name}.safetensors"))
        scalars = meta["optimizers"][name]
        state: dict = {}
        for key, val in tensors.items():
            idx, field = key.split(".", 1)
            state.setdefault(int(idx), {})[field] = val
        for idx, entry in scalars["state"].items():
            state.setdefault(int(idx), {}).update(entry)
        opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
    return int(meta["step"])
