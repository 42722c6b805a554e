"""Trace one complete training iteration of a method on ``meta`` tensors: memory and FLOPs.

The method is built by its own factory on a ``meta`` teacher of the real architecture, prepared
by the real training policy and run through the real loop's ``iteration`` (every optimizer group
in order with its backward and optimizer step, then the EMA update), under
``torch.distributed._tools.mem_tracker.MemTracker`` (every tensor's storage, by kind) and
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; forward, backward
and recomputation). Nothing is allocated. The optimizers and gradients start as they are in a run in progress
(``warm_state``: moments made, no gradient left over), so the peak is that of any later
iteration, not of the first.
Fused attention and CUDA autocast are modelled by ``components.planning.kernels``; the ``meta``
kernels' results are memoised (``components.planning.meta_cache``: the same figures, faster).

The iterations traced are the first of each group (a method with phases, e.g. InstaFlow's reflow
then distillation, is traced in each phase), in order, so state made earlier (optimizer moments,
a phase's frozen copy) is alive later, as in the run. The peak is recorded for one GPU and for
``shards`` GPUs at once: under FSDP2 the state modules' parameters, gradients, optimizer state
and EMA are split over the GPUs while activations, temporaries and the frozen teacher are not, so
the peak on N GPUs is the largest ``sharded / N + replicated`` over the trace.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils.flop_counter import FlopCounterMode

from components.ema import EMA
from components.planning.kernels import ATTENTION_FLOPS, GpuKernels
from components.planning.meta_cache import MetaCache
from components.planning.teachers import SpecBatches, TeacherSpec, spec_teacher
from components.policy import PolicyConfig, TrainingPolicy, blocks, frozen_denoisers
from components.training import LoopConfig, iteration

KINDS = ("params", "buffers", "grads", "optimizer", "ema", "activations", "temporaries")
_KIND = {_MemRefType.PARAM: "params", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "grads",
         _MemRefType.OPT: "optimizer", _MemRefType.OTH: "ema", _MemRefType.ACT: "activations",
         _MemRefType.TEMP: "temporaries"}
SHARDED = ("grads", "optimizer", "ema")  # plus the state modules' parameters


@dataclass
class Trace:
    """What one traced run of iterations measured at micro-batch ``micro_batch``.

    ``peaks[n]``: bytes by kind (``KINDS``) at the peak on each of n GPUs (kinds in ``SHARDED``
    and the state parameters already divided by n). ``group_flops``: FLOPs of one update of each
    group; ``group_updates``: how many updates each makes in the run's ``run_steps`` iterations.
    ``state_params`` / ``frozen_params``: bytes of the parameters the state modules hold
    (sharded) and the rest (replicated); ``block_params``: the largest FSDP2 unit's and the
    parameters outside every block (the root unit's), bytes.
    """

    micro_batch: int
    peaks: dict[int, dict[str, int]]
    group_flops: dict[str, int]
    state_params: int
    frozen_params: int
    block_params: tuple[int, int]
    steps: tuple[int, ...]
    seconds: float
    run_steps: int = 0
    total_flops: int = 0  # of all the traced iterations
    series: tuple[list[int], list[int]] = ((), ())  # (sharded, replicated) bytes after each op
    group_updates: dict[str, int] = field(default_factory=dict)
    ops: list = field(default_factory=list)  # the operator of each series entry


class _Tracker(MemTracker):
    """``MemTracker`` keeping only the whole-run peaks (for each GPU count), with tensors made
    inside ``ema()`` counted as the EMA's (``Other``)."""

    def __init__(self, shards: tuple[int, ...], state_params: int):
        super().__init__()
        self.in_ema = False
        self.shards, self.state_params = shards, state_params
        self.best = {n: -1 for n in shards}
        self.peaks: dict[int, dict[str, int]] = {}
        self.series: tuple[list[int], list[int]] = ([], [])  # (sharded, replicated) per op
        self.ops: list = []  # the operator of each series entry
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.op = func
        return super().__torch_dispatch__(func, types, args, kwargs)

    @contextlib.contextmanager
    def ema(self):
        self.in_ema = True
        try:
            yield
        finally:
            self.in_ema = False

    def _track(self, reftype, t):
        super()._track(_MemRefType.OTH if self.in_ema else reftype, t)

    # MemTracker's module hooks keep per-module snapshots (and refuse a network called twice
    # in one iteration); only what the categories need is kept: parameters and gradients of
    # each module seen, and the recomputation of checkpointed blocks counted as activations.
    def _pre_fw_hook(self, module, inputs) -> None:
        if module not in self.memory_tracking:
            self._track_parameters(module)
            self.memory_tracking[module] = True
        elif self._mod_tracker.is_bw and self._ac_mod is None:
            self._ac_mod, self._in_ac = weakref.ref(module), True

    def _track_parameters(self, module) -> None:
        """Parameters and buffers by kind; gradients (and their hooks) of trained ones only
        (``MemTracker`` would hook every parameter, which frozen ones refuse)."""
        def on_grad(p):
            self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)

        for p in module.parameters():
            self._update_and_maybe_create_winfos(p, _MemRefType.PARAM)
            if p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (
                    p.register_hook(lambda g: g),
                    p.register_post_accumulate_grad_hook(on_grad))
        for b in module.buffers():
            self._update_and_maybe_create_winfos(b, _MemRefType.BUFFER)

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod, self._in_ac = None, False

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    def _update_peak_stats(self, peak_state) -> None:
        for snap in self._curr_mem_snap.values():
            kinds = {_KIND[k]: v for k, v in snap.items() if k in _KIND}
            sharded = sum(kinds[k] for k in SHARDED) + self.state_params
            replicated = sum(kinds.values()) - sharded  # the state parameters counted once
            self.series[0].append(sharded)
            self.series[1].append(replicated)
            self.ops.append(self.op)
            for n in self.shards:
                total = sharded // n + replicated
                if total > self.best[n]:
                    self.best[n] = total
                    self.peaks[n] = _divided(kinds, n, self.state_params)


def _divided(kinds: dict[str, int], n: int, state_params: int) -> dict[str, int]:
    out = {k: kinds.get(k, 0) // n if k in SHARDED else kinds.get(k, 0) for k in KINDS}
    out["params"] = out["params"] - state_params + state_params // n
    return out


class _TrackedEMA(EMA):
    """The loop's EMA, its tensors counted as the EMA's by ``tracker``."""

    def __init__(self, module, cfg, batch_size: int, tracker: _Tracker):
        self.tracker = tracker
        super().__init__(module, cfg, batch_size)

    def reset(self, module) -> None:
        with self.tracker.ema():
            super().reset(module)

    def update(self, module, n: int) -> None:
        with self.tracker.ema():
            super().update(module, n)


class _TracePolicy(TrainingPolicy):
    """The training policy with CUDA autocast modelled (``torch.autocast`` has no meta)."""

    def __init__(self, cfg: PolicyConfig, kernels: GpuKernels):
        super().__init__(cfg)
        self.kernels = kernels

    def autocast(self, device: torch.device):
        return self.kernels.region() if self.bf16 else contextlib.nullcontext()

    def prepare(self, method) -> dict:
        opts = super().prepare(method)
        if self.cfg.activation_checkpointing:  # recomputation under the same kernel model
            networks = [*method.state_modules().values(), *frozen_denoisers(method).values()]
            for module in (m for net in networks for m in net.modules()):
                if hasattr(module, "enable_gradient_checkpointing") and hasattr(module, "config"):
                    module.enable_gradient_checkpointing(self.kernels.checkpoint)
        return opts


def _nbytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def _param_split(method) -> tuple[int, int, tuple[int, int]]:
    """Bytes of the state modules' parameters, of the others, and the FSDP2 unit sizes."""
    state = list(method.state_modules().values())
    state_p = [p for m in state for p in m.parameters()]
    frozen = [p for m in frozen_denoisers(method).values() for p in m.parameters()]
    units = [_nbytes(b.parameters()) for m in state for b in blocks(m)]
    in_blocks = {id(p) for m in state for b in blocks(m) for p in b.parameters()}
    root = _nbytes(p for p in state_p if id(p) not in in_blocks)
    return _nbytes(state_p), _nbytes(frozen), (max(units, default=0), root)


@torch.no_grad()
def warm_state(opts: dict) -> None:
    """The state of a run in progress: every optimizer has its moments (Adam makes them at its
    first step); no gradient outlives its group's update (``update_group`` frees them after its
    step)."""
    for opt in opts.values():
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def traced_steps(method) -> tuple[int, ...]:
    """The first iteration of each group (each phase's first, for methods with phases)."""
    return tuple(sorted({g.start for g in method.groups}))


SHAPES = MetaCache()  # shared by every trace: later ones repeat the shapes of earlier ones


def trace(build, spec: TeacherSpec, policy: PolicyConfig, micro_batch: int, run_steps: int,
          shards: tuple[int, ...] = (1,), rules: str = "cuda",
          shapes: MetaCache | None = SHAPES,
          repeats: tuple[tuple[str, str, int], ...] = ()) -> Trace:
    """Trace the method that ``build(teacher)`` makes (its factory with its config and the
    run length ``run_steps``) at ``micro_batch`` images per GPU and micro-batch, with the peaks
    on each number of GPUs in ``shards``; autocast follows CUDA's ``rules`` (or ``"cpu"``).
    ``shapes`` memoises the ``meta`` kernels (None: every kernel runs; the same figures).
    ``repeats``: (group, network attribute, n) for a network whose last call in the group's
    update is counted n more times (``components.planning.shortened_config``)."""
    start = time.perf_counter()
    kernels = GpuKernels(torch.bfloat16 if policy.precision == "bf16" else None, rules)
    method = build(spec_teacher(spec))
    run_policy = _TracePolicy(policy, kernels)
    opts = run_policy.prepare(method)
    warm_state(opts)
    state_p, frozen_p, units = _param_split(method)
    tracker = _Tracker(tuple(sorted(set(shards) | {1})), state_p)
    ema = _TrackedEMA(method.student(), method.ema, micro_batch, tracker)
    networks = [*method.state_modules().values(), *frozen_denoisers(method).values()]
    tracker.track_external(*networks, *opts.values(), *(ema.shadow or {}).values())
    flops = _GroupFlops(method)
    for group, attr, n in repeats:
        flops.repeat(group, getattr(method, attr), n)
    loop = LoopConfig(steps=max(traced_steps(method)) + 1, batch_size=micro_batch)
    batches = SpecBatches(spec)
    steps = traced_steps(method)
    with shapes or contextlib.nullcontext(), tracker, flops.counter, kernels:
        for step in steps:
            iteration(method, step, batches, loop, opts, ema, run_policy)
    flops.close()
    updates = {g.name: g.updates_before(run_steps) for g in method.groups}
    return Trace(micro_batch, tracker.peaks, flops.per_group, state_p, frozen_p, units, steps,
                 time.perf_counter() - start, run_steps,
                 flops.counter.get_total_flops() + flops.left_out,
                 tracker.series, updates, tracker.ops)


class _GroupFlops:
    """FLOPs of each group's update: the counter's total between successive ``loss`` calls."""

    def __init__(self, method):
        self.counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
        self.per_group: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.current: str | None = None
        self.left_out = 0  # FLOPs of the repeated calls, over every traced update
        self.mark = 0
        self.extra: list[tuple[str, int, dict]] = []  # (group, n, the network's last call)
        loss = method.loss

        def counted_loss(group, batch, scratch):
            self._switch(group)
            self.calls[group] = self.calls.get(group, 0) + 1
            return loss(group, batch, scratch)
        method.loss = counted_loss

    def repeat(self, group: str, network: torch.nn.Module, n: int) -> None:
        """Count ``network``'s last call in ``group``'s update ``n`` more times."""
        state = {"start": 0, "last": 0}

        def before(module, args):
            state["start"] = self.counter.get_total_flops()

        def after(module, args, out):
            state["last"] = self.counter.get_total_flops() - state["start"]

        network.register_forward_pre_hook(before)
        network.register_forward_hook(after)
        self.extra.append((group, n, state))

    def _switch(self, group: str | None) -> None:
        total = self.counter.get_total_flops()
        if self.current is not None:
            self.per_group[self.current] = self.per_group.get(self.current, 0) + total - self.mark
        self.current, self.mark = group, total

    def close(self) -> None:
        """End counting; ``per_group`` becomes the FLOPs of one update (one loss call each)."""
        self._switch(None)
        self.per_group = {g: f // self.calls[g] for g, f in self.per_group.items()}
        for group, n, state in self.extra:
            if group in self.per_group:
                self.per_group[group] += n * state["last"]
                self.left_out += self.calls[group] * n * state["last"]
