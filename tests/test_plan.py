"""The run planner (components/planning, pipeline/plan.py) on a tiny UNet.

The planner's numbers are checked against a real CPU run of the same iterations
(``bench.plan_check``): peak tensor bytes from the CPU allocator's own events, FLOPs from
``FlopCounterMode`` on the real run. Tolerances: peak within 15 % (the planner's target;
measured here 0.96 for bf16 + checkpointing, 1.00 for fp32), FLOPs within 1 % (the same
operators run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.plan_check import builder, compare
from components.architectures import scheduler_config
from components.methods import get_method
from components.planning import (
    GPUS,
    PlanRequest,
    TeacherSpec,
    make_plan,
    shortened_config,
    traceable_config,
)
from components.planning.estimate import HEADROOM
from components.planning.meta_cache import MetaCache
from components.planning.trace import trace
from components.policy import PolicyConfig
from pipeline import plan as plan_cli

# one cross-attention block each way, no mid block: the fewest operators of a real UNet
TINY_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": (32,), "down_block_types": ("CrossAttnDownBlock2D",),
             "up_block_types": ("CrossAttnUpBlock2D",), "cross_attention_dim": 16,
             "mid_block_type": None, "attention_head_dim": 8, "norm_num_groups": 8}
SPEC = TeacherSpec(TINY_UNET, scheduler_config("sd15"), text_length=4)


def test_planned_peak_and_flops_match_a_real_cpu_run():
    # bf16 autocast (by the CPU's rules here) and checkpointing's recomputation both modelled
    policy = PolicyConfig(precision="bf16", activation_checkpointing=True)
    row = compare("sid_lsg", SPEC, policy, micro_batch=4)
    assert 0.85 <= row["peak_ratio"] <= 1.15, row
    assert 0.99 <= row["flops_ratio"] <= 1.01, row
    assert row["breakdown_mib"]["optimizer"] > 0 and row["breakdown_mib"]["ema"] > 0


def test_the_trace_shortcuts_leave_the_figures_as_they_are():
    # memoised meta kernels: the same operators, tensors and figures as running every kernel
    policy = PolicyConfig(precision="bf16")
    build = builder("swiftbrush", 100)
    every = trace(build, SPEC, policy, 2, 100, (1, 8), shapes=None)
    cache = MetaCache()
    cached = trace(build, SPEC, policy, 2, 100, (1, 8), shapes=cache)
    assert cache.hits > cache.misses > 0
    for field in ("peaks", "group_flops", "total_flops", "series"):
        assert getattr(cached, field) == getattr(every, field), field
    # InstaFlow's 2-RF ODE traced for two Euler steps, the rest counted: the same peak and FLOPs
    cfg_cls, factory = get_method("instaflow")
    full, _ = traceable_config(cfg_cls(reflow_fraction=0.5, distill_ode_steps=4))
    short, repeats = shortened_config(full)
    assert short.distill_ode_steps == 2 and repeats == (("distill", "rf2", 2),)
    solved = trace(lambda t: factory(full, t, 100), SPEC, PolicyConfig(), 2, 100, (1, 8),
                   shapes=None)
    stepped = trace(lambda t: factory(short, t, 100), SPEC, PolicyConfig(), 2, 100, (1, 8),
                    repeats=repeats)
    for field in ("peaks", "group_flops", "total_flops"):
        assert getattr(stepped, field) == getattr(solved, field), field


BUILD = builder("sid_lsg", 100)


def _request(gpu_memory: float, **kw) -> PlanRequest:
    """A plan of SiD-LSG on the tiny UNet (one build: the plans share their traces)."""
    args = {"global_batch": 8, "grad_accum": 1, "gpus": 1, **kw}
    return PlanRequest("sid_lsg", BUILD, SPEC, PolicyConfig(), steps=100, gpu=GPUS["H100"],
                       gpu_memory_gib=gpu_memory, **args)


def test_a_plan_that_does_not_fit_says_what_makes_it_fit():
    fitting = make_plan(_request(80.0))
    assert fitting["fits"] and fitting["recommendation"]["suggestion"].startswith("fits")
    assert fitting["time"]["gpu_hours"] > 0 and fitting["time"]["tflop_per_image"] > 0
    per_image = fitting["recommendation"]["gib_per_image"]
    base = fitting["memory_gib"]["total"] - 8 * per_image  # the state, context included
    # micro-batch 8 does not fit, 2 does: accumulate 4 rounds of 2
    smaller = make_plan(_request((base + 2.5 * per_image) / (1 - HEADROOM)), suggest=False)
    assert not smaller["fits"] and smaller["recommendation"]["fits"]
    assert (smaller["recommendation"]["micro_batch"], smaller["recommendation"]["grad_accum"]) \
        == (2, 4)
    assert "gradient accumulation 4" in smaller["recommendation"]["suggestion"]
    # not even one image: a switch is needed (checkpointing and bf16 shrink the activations)
    tight = make_plan(_request((base + 0.9 * per_image) / (1 - HEADROOM)))
    assert not tight["recommendation"]["fits"]
    suggestion = tight["recommendation"]["suggestion"]
    assert suggestion.startswith("does not fit; cheapest switch:"), suggestion
    fitting_switches = [s for s in tight["recommendation"]["switches"] if s["fits"]]
    best = min(fitting_switches, key=lambda s: s["gpu_hours"])
    assert best["switch"] in suggestion
    assert best["micro_batch"] * best["grad_accum"] * best["gpus"] == 8


def test_sharding_divides_the_state_by_the_gpus():
    one, eight = make_plan(_request(80.0), suggest=False), make_plan(
        _request(80.0, gpus=8), suggest=False)
    for kind in ("grads", "optimizer", "ema"):
        assert eight["memory_gib"][kind] == pytest.approx(one["memory_gib"][kind] / 8, abs=2e-3)
    assert eight["memory_gib"]["fsdp_buffers"] > 0 == one["memory_gib"]["fsdp_buffers"]
    assert eight["run"]["micro_batch"] == 1 and eight["run"]["sharding"] == "fsdp2"


def test_cli_plans_the_configured_teacher(tmp_path, capsys):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    root = tmp_path / "project"
    teacher = root / "models" / "teacher"
    UNet2DConditionModel.from_config(TINY_UNET).save_config(teacher / "unet")
    DDIMScheduler(**scheduler_config("sd15")).save_config(teacher / "scheduler")
    (root / "params.yaml").write_text(Path("params.yaml").read_text())
    out = tmp_path / "plan.json"
    plan_cli.main(["--root", str(root), "--method", "swiftbrush", "--global-batch", "8",
                   "--micro-batch", "4", "--steps", "50", "--out", str(out)])
    plan = json.loads(out.read_text())
    assert plan["method"] == "swiftbrush" and plan["run"]["grad_accum"] == 2
    assert plan["fits"] and plan["memory_gib"]["total"] > 1.0
    printed = capsys.readouterr().out
    assert "peak per GPU" in printed and "recommendation:" in printed


def test_cli_help_and_bad_input(capsys):
    with pytest.raises(SystemExit) as done:
        plan_cli.main(["--help"])
    assert done.value.code == 0 and "--gpu-memory" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        plan_cli.main(["--arch", "sd15", "--global-batch", "10", "--gpus", "4"])
    assert "does not split" in str(bad.value.code) or "divisible" in str(bad.value.code)


def test_largest_micro_batch_reads_per_operator_lines_only_of_matching_traces():
    from components.planning.estimate import GIB, largest_micro_batch
    from components.planning.trace import Trace

    def traced(micro: int, series: list[int], ops: list[str]) -> Trace:
        peak = {k: 0 for k in ("params", "buffers", "grads", "optimizer", "ema",
                               "temporaries")}
        return Trace(micro, {1: {**peak, "activations": max(series)}}, {}, 0, 0, (0, 0), (0,),
                     0.0, series=([0] * len(series), series), ops=ops)

    # two operators: activations growing 4 GiB per image, then a 40 GiB state-only step
    gib = [4 * GIB, 40 * GIB]
    t1 = traced(1, gib, ["mm", "step"])
    t2 = traced(2, [8 * GIB, 40 * GIB], ["mm", "step"])
    # per operator: max(4 b, 40) GiB + 10 % allocator of 4 b + 1 GiB context <= 72 GiB usable
    # (80 GiB less 10 % headroom): 71.4 GiB at 16, 75.8 at 17
    assert largest_micro_batch(t1, t2, 1, False, 80.0) == 16
    # the same lengths, other operators (a random branch): the line through the two peaks
    # (40 GiB at 1 and 2: no growth), which any micro-batch fits
    other = traced(2, [8 * GIB, 40 * GIB], ["mm", "add"])
    assert largest_micro_batch(t1, other, 1, False, 80.0) == 2**20


def test_the_per_operator_series_counts_the_state_once_as_the_peaks_do():
    """Each operator's (sharded, replicated) bytes on n GPUs add up to the traced peak's
    breakdown at its highest operator (the state modules' parameters counted once, sharded)."""
    t = trace(BUILD, SPEC, PolicyConfig(), 2, 100, (1, 8))
    for n in (1, 8):
        highest = max(a // n + b for a, b in zip(*t.series))
        assert abs(highest - sum(t.peaks[n].values())) <= 8, n


def test_a_micro_batch_of_one_that_runs_other_operators_gets_a_third_trace(monkeypatch):
    from components.planning import planner
    from components.planning.trace import Trace

    traced = []

    def fake_trace(build, teacher, policy, micro, steps, shards, repeats=()):
        traced.append(micro)
        ops = ["permute", "view"] if micro == 1 else ["permute", "clone"]
        return Trace(micro, {n: {"activations": micro} for n in shards}, {}, 0, 0, (0, 0),
                     (0,), 0.0, series=([0, 0], [micro, micro]), ops=ops)

    monkeypatch.setattr(planner, "trace", fake_trace)
    monkeypatch.setattr(planner, "_CACHE", {})
    traces = planner._traces(_request(80.0, global_batch=1), PolicyConfig(), 1)
    assert traced == [1, 2, 4] and [t.micro_batch for t in planner._line(traces)] == [2, 4]
    traced.clear()
    traces = planner._traces(_request(80.0, global_batch=2), PolicyConfig(), 2)
    assert traced == [2, 4] and planner._line(traces) == traces  # matching: two suffice


def test_sharding_never_lowers_the_largest_micro_batch():
    from components.planning.estimate import GIB, largest_micro_batch
    from components.planning.trace import Trace

    def traced(micro: int) -> Trace:
        # a 30 GiB state (sharded) under the optimizer step, activations of 2 GiB per image
        # alive in the backward, where the state is 20 GiB
        series = ([20 * GIB, 30 * GIB], [2 * GIB * micro, 0])
        peak = {k: 0 for k in ("params", "buffers", "grads", "optimizer", "ema", "temporaries")}
        return Trace(micro, {n: {**peak, "activations": 2 * GIB * micro} for n in (1, 8)}, {},
                     0, 0, (0, 0), (0,), 0.0, series=series, ops=["mm", "step"])

    one = largest_micro_batch(traced(1), traced(2), 1, False, 80.0)
    eight = largest_micro_batch(traced(1), traced(2), 8, False, 80.0)
    assert 0 < one < eight
