"""The planner's table of every method on SD1.5 and SDXL (README: "Will it fit?").

    uv run python -m pipeline.plan_table --out reports/plan_table     # .md and .json
    uv run python -m pipeline.plan_table --archs sd15 --methods dmd2

For each method, teacher architecture (the published-recipe preset of that name, with the
method's published run length: iterations and global batch) and policy (fp32 as published by
most methods; bf16 with activation checkpointing), the planner traces the iteration at full size
(``pipeline.plan``) and reports, on one GPU and on eight with FSDP2 sharding: peak GiB per GPU at
micro-batch 1, the largest micro-batch on an 80 GiB GPU, TFLOP per image, predicted images/s on
H100s, and GPU-hours for the published run. Rows are written as they finish, so an interrupted
run keeps what it traced.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from components.methods import method_names
from components.planning import make_plan
from components.policy import PolicyConfig
from pipeline.plan import distill_config, request, teacher_spec

POLICIES = {"fp32": PolicyConfig(),
            "bf16 + checkpointing": PolicyConfig(precision="bf16", activation_checkpointing=True)}
NAMES = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL"}


def row(root: Path, method: str, arch: str, policy_name: str, memory: float = 80.0) -> dict:
    """One table row: the plans on one GPU and on eight (micro-batch 1 each)."""
    teacher_cfg, cfg = distill_config(root, arch, method)
    spec = teacher_spec(teacher_cfg, root, arch)
    batch = cfg.loop.batch_size
    run = replace(cfg, policy=POLICIES[policy_name], processes=1,
                  loop=replace(cfg.loop, grad_accum=batch))
    req = request(spec, run, "H100", memory, root)
    one = make_plan(req, suggest=False)
    # the same build: the eight-GPU plan reuses the traces (their peaks on 8 GPUs)
    eight = make_plan(replace(req, gpus=8, grad_accum=batch // 8), suggest=False)
    return {"method": method, "teacher": NAMES[arch], "policy": policy_name,
            "steps": cfg.loop.steps, "global_batch": batch,
            "peak_gib": [one["memory_gib"]["total"], eight["memory_gib"]["total"]],
            "largest_micro_batch": [one["recommendation"]["largest_micro_batch"],
                                    eight["recommendation"]["largest_micro_batch"]],
            "tflop_per_image": one["time"]["tflop_per_image"],
            "images_per_s": [one["time"]["images_per_second"],
                             eight["time"]["images_per_second"]],
            "gpu_hours": one["time"]["gpu_hours"], "efficiency": one["gpu"]["efficiency"],
            "notes": one["notes"]}


def markdown(rows: list[dict]) -> str:
    head = ("| method | teacher | policy | peak GiB/GPU, micro-batch 1 (1 GPU / 8 sharded) | "
            "largest micro-batch on 80 GB (1 / 8) | TFLOP/image | images/s on H100 (1 / 8) | "
            "published run | GPU-hours (H100) |")
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        mb = [str(b) if b < 2**20 else "any" for b in r["largest_micro_batch"]]
        lines.append(
            f"| {r['method']} | {r['teacher']} | {r['policy']} | {r['peak_gib'][0]:.1f} / "
            f"{r['peak_gib'][1]:.1f} | {mb[0]} / {mb[1]} | {r['tflop_per_image']:.2f} | "
            f"{r['images_per_s'][0]:.1f} / {r['images_per_s'][1]:.1f} | {r['steps']} it x "
            f"{r['global_batch']} | {r['gpu_hours']:,.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.plan_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("."))
    p.add_argument("--archs", nargs="+", default=["sd15", "sdxl"], choices=sorted(NAMES))
    p.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--out", type=Path, default=Path("reports/plan_table"))
    args = p.parse_args(argv)
    rows = []
    for arch in args.archs:
        for method in args.methods:
            for policy in args.policies:
                start = time.perf_counter()
                rows.append(row(args.root, method, arch, policy))
                print(f"{method} {arch} {policy}: {time.perf_counter() - start:.0f} s",
                      flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
                args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
