"""The plan of a distillation run: will it fit on the GPUs, how long will it take, what to change.

``make_plan`` traces the configured iteration at its micro-batch and at twice that (the memory
line; at four times too when a micro-batch of one runs other operators), and when no
micro-batch fits, the same with each switch that lowers memory: activation checkpointing, bf16,
both, and sharding over more GPUs (from the same traces). The suggestion is
the switch that fits with the fewest predicted GPU-hours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from components.planning import estimate
from components.planning.estimate import GIB, RunShape
from components.planning.gpus import GPU, efficiency, math_mode
from components.planning.teachers import TeacherSpec
from components.planning.text import TextRequest, text_plan
from components.planning.trace import Trace, trace
from components.policy import PolicyConfig

SHARD_COUNTS = (2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the method (``build(teacher) -> Method``), the teacher's architecture, the
    policy, the loop's global batch and accumulation, the GPUs, and the run length."""

    method: str
    build: Callable
    teacher: TeacherSpec
    policy: PolicyConfig
    global_batch: int
    grad_accum: int
    gpus: int
    steps: int
    gpu: GPU
    gpu_memory_gib: float
    results: Path | None = None  # benchmark results measuring the GPU's efficiency
    notes: tuple[str, ...] = ()  # what the trace leaves out
    repeats: tuple[tuple[str, str, int], ...] = ()  # calls traced once, counted n times
    text: TextRequest | None = None  # the text embeddings: on disk or encoded on the fly

    @property
    def resident_bytes(self) -> int:
        """Bytes on each GPU beside training: the text encoders, when they encode on the fly."""
        return self.text.resident_bytes if self.text else 0

    def text_seconds(self, gpus: int, flops_per_second: float) -> float:
        """Seconds per iteration the encoders take on the fly (0 with a disk cache)."""
        if not self.resident_bytes:
            return 0.0
        return self.global_batch * self.text.flops_per_prompt / (gpus * flops_per_second)

    @property
    def micro_batch(self) -> int:
        per_gpu, rest = divmod(self.global_batch, self.gpus * self.grad_accum)
        if rest or per_gpu < 1:
            raise ValueError(f"the global batch {self.global_batch} does not split into "
                             f"{self.gpus} GPUs x {self.grad_accum} accumulation rounds; "
                             "choose a batch divisible by gpus x grad_accum")
        return per_gpu


_CACHE: dict[tuple, tuple] = {}  # recent traces: plans of one run at other GPU sizes reuse them


def _traces(req: PlanRequest, policy: PolicyConfig, micro: int) -> tuple[Trace, ...]:
    """Traces at ``micro`` and ``2 * micro`` (the memory line), reused while the same build,
    teacher and policy are planned again (another GPU memory). When the two do not run the same
    operators (a micro-batch of one takes other layouts: a view where a larger batch copies),
    a third at ``4 * micro``: the line then runs through the last two (``_line``)."""
    shards = tuple(sorted({1, req.gpus, *SHARD_COUNTS}))
    key = (id(req.build), id(req.teacher), policy, micro, req.steps, shards)
    if key not in _CACHE:
        if len(_CACHE) >= 16:
            _CACHE.pop(next(iter(_CACHE)))

        def at(b: int) -> Trace:
            return trace(req.build, req.teacher, policy, b, req.steps, shards,
                         repeats=req.repeats)

        traces = (at(micro), at(2 * micro))
        if traces[0].ops != traces[1].ops:
            traces = (*traces, at(4 * micro))
        _CACHE[key] = (traces, req.build, req.teacher)  # alive: their ids stay theirs
    return _CACHE[key][0]


def _line(traces: tuple[Trace, ...]) -> tuple[Trace, Trace]:
    """The two traces the memory line runs through (see ``_traces``)."""
    return traces[-2], traces[-1]


def _option(req: PlanRequest, policy: PolicyConfig, gpus: int, traces) -> dict:
    """How a policy and GPU count would run: largest micro-batch, accumulation, time."""
    bf16 = policy.precision == "bf16"
    line = estimate.memory_line(*_line(traces), gpus, bf16)
    largest = estimate.largest_micro_batch(*_line(traces), gpus, bf16, req.gpu_memory_gib,
                                           req.resident_bytes)
    split = estimate.accumulation(req.global_batch, gpus, largest)
    mode = math_mode(policy.precision, policy.tf32)
    eff, _ = efficiency(req.gpu, mode, req.results)
    shape = RunShape(req.global_batch, gpus, req.steps, bf16)
    time = estimate.timing(traces[0], shape, req.gpu, mode, eff,
                           req.text_seconds(gpus, estimate.rate(req.gpu, mode, eff)))
    return {"precision": policy.precision,
            "activation_checkpointing": policy.activation_checkpointing, "gpus": gpus,
            "fits": split is not None, "largest_micro_batch": largest,
            "micro_batch": split[0] if split else None,
            "grad_accum": split[1] if split else None,
            "gib_per_image": _sig(line[1] / GIB), "gpu_hours": _sig(time["gpu_hours"])}


def _switches(req: PlanRequest, traces) -> list[dict]:
    """Each single change (and bf16 with checkpointing) that lowers memory, evaluated."""
    policy, out = req.policy, []
    for gpus in (n for n in SHARD_COUNTS if n > req.gpus):
        option = _option(req, policy, gpus, traces)
        if option["fits"]:
            out.append({"switch": f"shard over {gpus} GPUs", **option})
            break
    variants = {"activation checkpointing": {"activation_checkpointing": True},
                "bf16": {"precision": "bf16"},
                "bf16 + activation checkpointing": {"precision": "bf16",
                                                    "activation_checkpointing": True}}
    for name, change in variants.items():
        new = replace(policy, **change)
        if new == policy:
            continue
        out.append({"switch": name, **_option(req, new, req.gpus, _traces(req, new, 1))})
    return out


def _suggestion(req: PlanRequest, fits: bool, current: dict, switches: list[dict]) -> str:
    if fits:
        largest = current["largest_micro_batch"]
        return (f"fits as configured (micro-batch {req.micro_batch}); the largest micro-batch "
                f"that fits is {largest}" + (f" (gradient accumulation {current['grad_accum']})"
                                             if current["grad_accum"] else ""))
    if current["fits"]:
        return (f"use micro-batch {current['micro_batch']} per GPU with gradient accumulation "
                f"{current['grad_accum']} (distill.loop.grad_accum: {current['grad_accum']}) "
                f"to keep the global batch {req.global_batch}")
    fitting = sorted((s for s in switches if s["fits"]), key=lambda s: s["gpu_hours"])
    if not fitting:
        return (f"does not fit on {req.gpu_memory_gib:g} GiB GPUs even with bf16, activation "
                f"checkpointing or sharding over up to {SHARD_COUNTS[-1]} GPUs")
    best = fitting[0]
    return (f"does not fit; cheapest switch: {best['switch']} (micro-batch "
            f"{best['micro_batch']}, gradient accumulation {best['grad_accum']}, "
            f"{best['gpus']} GPU(s), {best['gpu_hours']} GPU-hours)")


def make_plan(req: PlanRequest, suggest: bool = True) -> dict:
    """The plan as a JSON-ready dict (memory in GiB per GPU; see ``estimate``)."""
    traces = _traces(req, req.policy, req.micro_batch)
    bf16 = req.policy.precision == "bf16"
    mem = estimate.memory(traces[0], req.gpus, bf16)
    training = mem["total"]
    if req.resident_bytes:
        mem["text_encoders"] = float(req.resident_bytes)
        mem["total"] = training + req.resident_bytes
    mode = math_mode(req.policy.precision, req.policy.tf32)
    eff, source = efficiency(req.gpu, mode, req.results)
    rate = estimate.rate(req.gpu, mode, eff)
    shape = RunShape(req.global_batch, req.gpus, req.steps, bf16)
    current = _option(req, req.policy, req.gpus, traces)
    usable = estimate.usable_bytes(req.gpu_memory_gib)
    fits = mem["total"] <= usable
    switches = _switches(req, traces) if suggest and not current["fits"] else []
    return {
        "method": req.method, "teacher": {"family": req.teacher.family,
                                          "network": _arch(req.teacher)},
        "policy": asdict(req.policy),
        "run": {"global_batch": req.global_batch, "micro_batch": req.micro_batch,
                "grad_accum": req.grad_accum, "gpus": req.gpus,
                "sharding": "fsdp2" if req.gpus > 1 else "none", "steps": req.steps},
        "gpu": {"name": req.gpu.name, "memory_gib": req.gpu_memory_gib, "math": mode,
                "peak_tflops": getattr(req.gpu, mode), "efficiency": round(eff, 3),
                "efficiency_source": source},
        "memory_gib": estimate.gib(mem), "fits": fits,
        "usable_gib": round(usable / GIB, 2),
        "flops": {"per_group_tflop_per_image": {
            g: _sig(f / 1e12) for g, f in estimate.flops_per_image(traces[0]).items()}},
        "time": {k: _sig(v) for k, v in estimate.timing(
            traces[0], shape, req.gpu, mode, eff, req.text_seconds(req.gpus, rate)).items()},
        **({"text_embeddings": text_plan(req.text, training, usable, req.global_batch, req.gpus,
                                         rate)} if req.text else {}),
        "recommendation": {**current, "switches": switches,
                           "suggestion": _suggestion(req, fits, current, switches)},
        "assumptions": {"headroom": estimate.HEADROOM, "allocator": estimate.ALLOCATOR,
                        "cuda_context_gib": estimate.CUDA_CONTEXT_GIB,
                        "attention": "fused (FlashAttention-like saved tensors)",
                        "communication": "FSDP2 collectives overlapped with compute"},
        "notes": list(req.notes),
        "trace": {"iterations": list(traces[0].steps),
                  "micro_batches": [t.micro_batch for t in traces]},
    }


def _arch(spec: TeacherSpec) -> dict:
    keys = ("block_out_channels", "cross_attention_dim", "sample_size", "addition_embed_type",
            "num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim")
    return {k: spec.network[k] for k in keys if k in spec.network}


def _sig(value: float) -> float:
    return float(f"{value:.4g}")
