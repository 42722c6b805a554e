"""Training checkpoints through ``torch.distributed.checkpoint`` (DCP): sharded, reshardable.

A checkpoint ``step-N/`` holds one DCP checkpoint of a flat state dict plus ``state.json``:
- ``model/<module>/<key>``: the trained weights of every state module (all of its state when no
  optimizer holds any of its parameters, e.g. a phase's frozen copy),
- ``ema/<key>``: the student's EMA, where its parameters live (sharded with them under FSDP2),
- ``optim/<group>/<parameter name>/<field>``: optimizer state keyed by parameter name, not by
  position, so it maps onto any sharding; ``state.json`` has the step, the optimizers'
  hyper-parameters and their non-tensor state.
Each process writes its own shards once; DCP reshards on load, so a run saved with 2 processes
resumes with 1 and the reverse. Loading is strict: a missing or unexpected key is an error.
Tensors load in place into the live parameters, EMA and optimizer state, so they stay on their
device and dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from components import distributed


def _dcp():
    """``torch.distributed.checkpoint``, imported when a checkpoint is read or written: it pulls
    in DTensor and sympy (seconds), which stages that never checkpoint should not pay for."""
    import torch.distributed.checkpoint as dcp

    return dcp


class CheckpointError(RuntimeError):
    """A checkpoint does not match the run that loads it."""


def _names(method) -> dict[int, str]:
    """Parameter id -> ``<module>/<name>`` over the method's state modules."""
    return {id(p): f"{m}/{n}" for m, module in method.state_modules().items()
            for n, p in module.named_parameters()}


def model_state(method, opts: dict) -> dict[str, torch.Tensor]:
    """The checkpointed tensors of the state modules (views of the live tensors)."""
    held = {id(p) for opt in opts.values() for g in opt.param_groups for p in g["params"]}
    out = {}
    for name, module in method.state_modules().items():
        trained = {n for n, p in module.named_parameters() if id(p) in held}
        for key, value in module.state_dict().items():
            if key in trained or not trained:
                out[f"model/{name}/{key}"] = value
    return out


def _optimizer_state(name: str, opt: torch.optim.Optimizer, names: dict[int, str]):
    params = [p for g in opt.param_groups for p in g["params"]]
    tensors, scalars = {}, {}
    for idx, entry in opt.state_dict()["state"].items():
        fqn = names[id(params[idx])]
        for field, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim/{name}/{fqn}/{field}"] = value
            else:
                scalars.setdefault(fqn, {})[field] = value
    groups = [{k: v for k, v in g.items() if k != "params"}
              for g in opt.state_dict()["param_groups"]]
    return tensors, {"param_groups": groups, "state": scalars}


def _ema_state(ema) -> dict[str, torch.Tensor]:
    """The EMA's tensors under ``ema/``; none when the method keeps no average (DMD2)."""
    return {f"ema/{k}": v for k, v in (ema.shadow or {}).items()}


def save_checkpoint(ckpt_dir: Path, method, opts: dict, ema, step: int) -> None:
    """Write ``ckpt_dir/step-N`` from every process, then (rank 0) point ``latest`` at it."""
    ctx = distributed.context()
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".step-{step:07d}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    names = _names(method)
    state = {**model_state(method, opts), **_ema_state(ema)}
    meta: dict = {"step": step, "optimizers": {}}
    for name, opt in opts.items():
        tensors, meta["optimizers"][name] = _optimizer_state(name, opt, names)
        state.update(tensors)
    _dcp().save(state, checkpoint_id=tmp, no_dist=ctx.world_size == 1)
    if ctx.is_main:
        (tmp / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (ckpt_dir / "latest.tmp").write_text(final.name)
        os.replace(ckpt_dir / "latest.tmp", ckpt_dir / "latest")
        for old in sorted(ckpt_dir.glob("step-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def _check_keys(saved: set[str], expected: set[str], src: Path) -> None:
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {src} does not match this run: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); delete it to "
            "start afresh")


def _optimizer_targets(name: str, opt, names: dict[int, str], saved: dict) -> dict:
    """Destination tensors for the saved state of ``opt``: like the parameter when shaped like
    it (so sharded like it), else plain CPU tensors (step counters)."""
    by_name = {names[id(p)]: p for g in opt.param_groups for p in g["params"]}
    out = {}
    for key, md in saved.items():
        if not key.startswith(f"optim/{name}/"):
            continue
        fqn = key[len(f"optim/{name}/"):].rsplit("/", 1)[0]
        if fqn not in by_name:
            raise CheckpointError(f"optimizer {name!r} of the checkpoint has state for "
                                  f"{fqn!r}, which this run's optimizer does not hold")
        p, dtype = by_name[fqn], md.properties.dtype
        same = tuple(md.size) == tuple(p.shape)
        out[key] = torch.zeros_like(p, dtype=dtype) if same else torch.zeros(md.size, dtype=dtype)
    return out


def _restore_optimizer(opt, name: str, targets: dict, scalars: dict, names: dict) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    index = {names[id(p)]: i for i, p in enumerate(params)}
    state: dict = {}
    for key, value in targets.items():
        fqn, field = key[len(f"optim/{name}/"):].rsplit("/", 1)
        state.setdefault(index[fqn], {})[field] = value
    for fqn, entry in scalars["state"].items():
        state.setdefault(index[fqn], {}).update(entry)
    groups, start = [], 0
    for live, saved in zip(opt.param_groups, scalars["param_groups"], strict=True):
        groups.append({**saved, "params": list(range(start, start + len(live["params"])))})
        start += len(live["params"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(ckpt_dir: Path, method, opts: dict, ema) -> int:
    """Restore the newest complete checkpoint in place; return the step to continue from."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return 0
    src = ckpt_dir / pointer.read_text().strip()
    meta = json.loads((src / "state.json").read_text())
    saved = _dcp().FileSystemReader(src).read_metadata().state_dict_metadata
    names = _names(method)
    live = {**model_state(method, opts), **_ema_state(ema)}
    targets = {name: _optimizer_targets(name, opt, names, saved) for name, opt in opts.items()}
    expected = set(live).union(*targets.values())
    _check_keys(set(saved), expected, src)
    _dcp().load({**live, **{k: v for t in targets.values() for k, v in t.items()}},
             checkpoint_id=src, no_dist=distributed.context().world_size == 1)
    for name, opt in opts.items():
        _restore_optimizer(opt, name, targets[name], meta["optimizers"][name], names)
    return int(meta["step"])


def checkpoint_step(ckpt_dir: Path) -> int:
    """The step of the newest complete checkpoint in ``ckpt_dir`` (0 if none)."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return 0
    return int(json.loads((ckpt_dir / pointer.read_text().strip() / "state.json").read_text())[
        "step"])


def checkpoint_weights(path: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The full weights of state module ``name`` in a checkpoint, on the CPU (``None`` if it
    holds none), to start another run from: ``path`` is a ``step-N`` folder or a run's
    checkpoint directory (its ``latest``)."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no state.json): give a "
                                "run's checkpoint directory or one of its step-N folders")
    prefix = f"model/{name}/"
    saved = _dcp().FileSystemReader(path).read_metadata().state_dict_metadata
    state = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in saved.items()
             if k.startswith(prefix)}
    if not state:
        return None
    _dcp().load(state, checkpoint_id=path, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}
