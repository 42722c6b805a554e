"""The planner's table of every method on each teacher family (README: "Will it fit?").

    uv run python -m pipeline.plan_table --out reports/plan_table     # .md and .json
    uv run python -m pipeline.plan_table --archs sd15 --methods dmd2
    uv run python -m pipeline.plan_table --archs flux1 sd35m --append  # add rows to the file

For each method, teacher architecture and policy (fp32 as published by most methods; bf16 with
activation checkpointing), the planner traces the iteration at full size (``pipeline.plan``)
with the method's published recipe (the preset of the architecture's name: run length in
iterations and global batch; the flow transformers, which no method published a run on, take
the SDXL recipe, ``RECIPES``) and reports, on one GPU and on eight with FSDP2 sharding: peak
GiB per GPU at micro-batch 1, the largest micro-batch on an 80 GiB GPU, TFLOP per image,
predicted images/s on H100s, and GPU-hours for the published run. A method that does not apply
to the teacher is a row saying why. Rows are written as they finish, so an interrupted run
keeps what it traced.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from components.config import ConfigError
from components.methods import method_names
from components.planning import make_plan
from components.policy import PolicyConfig
from pipeline.plan import distill_config, request, teacher_spec

POLICIES = {"fp32": PolicyConfig(),
            "bf16 + checkpointing": PolicyConfig(precision="bf16", activation_checkpointing=True)}
NAMES = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL", "sd35m": "SD3.5 Medium",
         "sd35l": "SD3.5 Large", "flux1": "FLUX.1-dev", "sana": "SANA 1.6B",
         "sana600m": "SANA 0.6B"}
RECIPES = {"sd35m": "sdxl", "sd35l": "sdxl", "flux1": "sdxl", "sana": "sdxl",
           "sana600m": "sdxl"}  # the preset of each teacher
ANY = 2**20  # the planner's bound on the largest micro-batch: memory does not grow with it


def row(root: Path, method: str, arch: str, policy_name: str, memory: float = 80.0) -> dict:
    """One table row: the plans on one GPU and on eight (micro-batch 1 each)."""
    teacher_cfg, cfg, _ = distill_config(root, RECIPES.get(arch, arch), method)
    spec = teacher_spec(teacher_cfg, root, arch)
    batch = cfg.loop.batch_size
    run = replace(cfg, policy=POLICIES[policy_name], processes=1,
                  loop=replace(cfg.loop, grad_accum=batch))
    head = {"method": method, "teacher": NAMES[arch], "policy": policy_name,
            "recipe": RECIPES.get(arch, arch), "steps": cfg.loop.steps, "global_batch": batch}
    try:
        req = request(spec, run, "H100", memory, root)
    except ConfigError as err:
        return {**head, "refused": str(err)}
    one = make_plan(req, suggest=False)
    # the same build: the eight-GPU plan reuses the traces (their peaks on 8 GPUs)
    eight = make_plan(replace(req, gpus=8, grad_accum=batch // 8), suggest=False)
    return {**head, "peak_gib": [one["memory_gib"]["total"], eight["memory_gib"]["total"]],
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
        if "refused" in r:
            lines.append(f"| {r['method']} | {r['teacher']} | {r['policy']} | refused: "
                         f"{r['refused'].split(': ', 1)[-1]} |" + " |" * 5)
            continue
        mb = [str(b) if b < ANY else "any" for b in r["largest_micro_batch"]]
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
    p.add_argument("--append", action="store_true", help="keep the rows already in --out "
                   "(a row traced again replaces its old one)")
    args = p.parse_args(argv)
    old = args.out.with_suffix(".json")
    rows = json.loads(old.read_text()) if args.append and old.exists() else []
    for arch in args.archs:
        for method in args.methods:
            for policy in args.policies:
                start = time.perf_counter()
                rows = [r for r in rows if (r["method"], r["teacher"], r["policy"]) != (
                    method, NAMES[arch], policy)]
                rows.append(row(args.root, method, arch, policy))
                rows[-1]["seconds"] = round(time.perf_counter() - start)
                print(f"{method} {arch} {policy}: {rows[-1]['seconds']} s", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
                args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
