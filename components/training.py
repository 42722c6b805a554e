"""The method-agnostic distillation loop.

It owns optimizers (one per method group), the update ratio of each group, gradient accumulation,
per-sample NaN filtering, gradient clipping, EMA of the student, checkpoint/resume and logging.
All randomness of iteration ``k`` comes from a generator seeded with ``(seed, k)``, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
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
from components.methods import Batch, Method

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
                 scratch: list[dict], batch_size: int) -> dict:
    """Accumulate the group's loss over micro-batches, drop non-finite samples, clip, step."""
    opt.zero_grad(set_to_none=True)
    metrics: dict = {}
    dropped = 0
    for mb, sc in zip(micro, scratch):
        per_sample, m = method.loss(group.name, mb, sc)
        finite = torch.isfinite(per_sample)
        dropped += int((~finite).sum())
        if finite.any():
            (per_sample[finite].sum() / batch_size).backward()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v / len(micro)
    params = method.parameters(group.name)
    distributed.all_reduce_gradients(params)  # sum over processes: the global batch's gradient
    metrics[f"dropped_{group.name}"] = dropped
    metrics = distributed.reduce_metrics(metrics, summed=[f"dropped_{group.name}"])
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if group.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, group.max_grad_norm)
        metrics[f"grad_norm_{group.name}"] = float(norm)
    for pg in opt.param_groups:
        pg["lr"] = pg.setdefault("initial_lr", pg["lr"]) * group.lr_factor(micro[0].step)
    opt.step()
    return metrics


def train(method: Method, batches: BatchSource, cfg: LoopConfig, ckpt_dir: Path, log: LogFn,
          on_sample: Callable[[torch.nn.Module, int], None],
          progress: Callable[[int, int], None] | None = None) -> EMA:
    """Run ``cfg.steps`` iterations (resuming from ``ckpt_dir``); return the student's EMA.

    ``batches(batch_size, generator, step)`` draws iteration ``step``'s batch (prompts, or teacher
    pairs) from that iteration's generator (``components.batches``). Under torchrun/accelerate
    the batch is global and each process takes its rows (``components.distributed``).
    """
    ctx = distributed.context()
    distributed.broadcast_modules(method.state_modules().values())
    opts = {g.name: method.make_optimizer(g.name) for g in method.groups}
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
                                            cfg.batch_size))
        ema.update(method.student())
        done = step + 1
        if not ctx.is_main:  # rank 0 logs, samples and checkpoints for the job
            continue
        if done % cfg.log_every == 0 or done == cfg.steps:
            log(metrics, done)
        if done % cfg.sample_every == 0 or done == cfg.steps:
            on_sample(method.student(), done)
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
    save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
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
