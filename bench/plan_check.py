"""Validation of the run planner on the CPU: predicted vs measured peak memory and FLOPs.

    python -m bench.plan_check                          # every method, SD1.5 topology, widths / 4
    python -m bench.plan_check --arch sdxl --divisor 8 --latent 16 --methods dmd2

For each method and precision the planner traces the iterations it plans (``components.planning``,
``meta`` tensors, autocast by the CPU's rules here) and the same iterations then run for real on
the CPU, from the same warm state (optimizer moments and gradients present), under
``torch.profiler`` with memory profiling: the allocator's own allocation and free events give the
measured peak of tensor bytes (above the state allocated before the iteration, which both
count), and ``FlopCounterMode`` counts the real run's FLOPs. A GPU adds what a CPU lacks
(CUDA context, caching allocator, fused kernels chosen per GPU): checked on a GPU, not here.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from components.architectures import ARCHS, DIVISORS, scheduler_config, unet_config
from components.ema import EMA
from components.methods import get_method, method_names
from components.planning import traceable_config
from components.planning.kernels import ATTENTION_FLOPS
from components.planning.trace import (
    KINDS,
    SpecBatches,
    TeacherSpec,
    spec_teacher,
    trace,
    traced_steps,
    warm_state,
)
from components.policy import PolicyConfig, TrainingPolicy, frozen_denoisers
from components.training import LoopConfig, iteration

_WINDOW = "plan_check.iterations"
OVERRIDES = {"instaflow": {"reflow_fraction": 0.5}, "meng": {"stage1_fraction": 0.5}}


def builder(name: str, steps: int):
    """``build(teacher)`` of method ``name``: published defaults, phases at the run's middle."""
    cfg_cls, factory = get_method(name)
    cfg, _ = traceable_config(cfg_cls(**OVERRIDES.get(name, {})))
    return lambda teacher: factory(cfg, teacher, steps)


def _live_bytes(method, opts: dict, ema: EMA) -> int:
    tensors = [t for m in [*method.state_modules().values(), *frozen_denoisers(method).values()]
               for t in [*m.parameters(), *m.buffers()]]
    tensors += [p.grad for m in method.state_modules().values() for p in m.parameters()
                if p.grad is not None]
    tensors += [v for opt in opts.values() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v)]
    tensors += list((ema.shadow or {}).values())
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_cpu(build, spec: TeacherSpec, policy: PolicyConfig, micro_batch: int,
               run_steps: int) -> dict:
    """Peak tensor bytes (allocator events) and FLOPs of the planned iterations, run for real.

    The profiler runs from before the method is built: a block allocated before profiling
    starts has no size in its free event, so the state a phase start replaces (the old
    optimizer moments and EMA average) would stay counted after it is freed."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        method = build(spec_teacher(spec, "cpu"))
        run_policy = TrainingPolicy(policy)
        opts = run_policy.prepare(method)
        warm_state(opts)
        ema = EMA(method.student(), method.ema, micro_batch)
        before = _live_bytes(method, opts, ema)
        loop = LoopConfig(steps=run_steps, batch_size=micro_batch)
        batches = SpecBatches(spec, "cpu")
        counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
        with record_function(_WINDOW), counter:
            for step in traced_steps(method):
                iteration(method, step, batches, loop, opts, ema, run_policy)
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == _WINDOW)
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = start = peak = 0  # start: tensor bytes live when the iterations begin
    for at, nbytes in memory:
        if at > window.end_ns():
            break
        live += nbytes
        if at < window.start_ns():
            start = peak = live
        else:
            peak = max(peak, live)
    return {"peak_bytes": before + peak - start, "flops": counter.get_total_flops()}


def predict(build, spec: TeacherSpec, policy: PolicyConfig, micro_batch: int,
            run_steps: int) -> dict:
    """The planner's peak tensor bytes on one device and FLOPs of the same iterations."""
    t = trace(build, spec, policy, micro_batch, run_steps, rules="cpu")
    return {"peak_bytes": sum(t.peaks[1][k] for k in KINDS),
            "flops": t.total_flops,
            "breakdown": {k: t.peaks[1][k] for k in KINDS}, "trace_s": round(t.seconds, 2)}


def compare(name: str, spec: TeacherSpec, policy: PolicyConfig, micro_batch: int,
            run_steps: int = 4) -> dict:
    build = builder(name, run_steps)
    start = time.perf_counter()
    predicted = predict(build, spec, policy, micro_batch, run_steps)
    measured = measure_cpu(build, spec, policy, micro_batch, run_steps)
    return {"method": name, "precision": policy.precision,
            "activation_checkpointing": policy.activation_checkpointing,
            "micro_batch": micro_batch,
            "predicted_peak_mib": round(predicted["peak_bytes"] / 2**20, 3),
            "measured_peak_mib": round(measured["peak_bytes"] / 2**20, 3),
            "peak_ratio": round(predicted["peak_bytes"] / measured["peak_bytes"], 4),
            "predicted_flops": predicted["flops"], "measured_flops": measured["flops"],
            "flops_ratio": round(predicted["flops"] / max(measured["flops"], 1), 4),
            "breakdown_mib": {k: round(v / 2**20, 3) for k, v in predicted["breakdown"].items()},
            "seconds": round(time.perf_counter() - start, 2)}


def reduced_spec(arch: str, divisor: int, latent: int) -> TeacherSpec:
    """The architecture at 1/``divisor`` width with ``latent``-sized latents."""
    return TeacherSpec({**unet_config(arch, divisor), "sample_size": latent},
                       scheduler_config(arch))


POLICIES = {"fp32": PolicyConfig(),
            "bf16 + checkpointing": PolicyConfig(precision="bf16",
                                                 activation_checkpointing=True)}


def table(rows: list[dict]) -> str:
    head = ("| method | policy | micro-batch | predicted peak MiB | measured peak MiB | "
            "predicted / measured | FLOPs predicted / measured |")
    lines = [head, "|" + " --- |" * 7]
    for r in rows:
        policy = r["precision"] + (" + checkpointing" if r["activation_checkpointing"] else "")
        lines.append(f"| {r['method']} | {policy} | {r['micro_batch']} | "
                     f"{r['predicted_peak_mib']:.1f} | {r['measured_peak_mib']:.1f} | "
                     f"{r['peak_ratio']:.3f} | {r['flops_ratio']:.4f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.plan_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="sd15")
    p.add_argument("--divisor", type=int, choices=DIVISORS, default=8)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results/plan-check-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = reduced_spec(args.arch, args.divisor, args.latent)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)"
    result = {"device": machine, "torch": torch.__version__, "arch": args.arch,
              "divisor": args.divisor, "latent": args.latent, "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        for policy in args.policies:
            row = compare(name, spec, POLICIES[policy], args.micro_batch)
            result["rows"].append(row)
            print(f"{name} {policy}: peak {row['peak_ratio']:.3f}, FLOPs "
                  f"{row['flops_ratio']:.4f} ({row['seconds']:.0f} s)", flush=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # kept if interrupted
    print(f"\n{args.arch} / {args.divisor}, latents {args.latent}x{args.latent}, {machine}\n")
    print(table(result["rows"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
