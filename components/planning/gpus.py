"""GPUs the planner knows: memory, dense peak throughput, and the efficiency it assumes.

Peaks are the vendors' data-sheet figures for dense math (no sparsity), TFLOP/s: ``bf16`` tensor
cores, ``tf32`` tensor cores (fp32 weights with ``distill.policy.tf32``), ``fp32`` without tensor
cores (the published fp32 recipes with TF32 off). Memory is what the driver reports, GiB.

Predicted time = FLOPs / (peak × efficiency). The efficiency (model-FLOPs utilisation) is a
stated default, ``DEFAULT_EFFICIENCY``, unless a benchmark measured it on that GPU: the newest
``bench.train_step`` result (``bench/results/*.json``) whose device names the GPU and whose policy
has the same precision gives achieved TFLOP/s over that peak, averaged over its rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16: float
    tf32: float
    fp32: float
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name for this GPU


GPUS = {
    "H100": GPU("H100 SXM 80GB", 79.6, 989.4, 494.7, 66.9, ("H100 80GB HBM3", "H100 SXM")),
    "H200": GPU("H200 SXM 141GB", 140.4, 989.4, 494.7, 66.9, ("H200",)),
    "A100-80GB": GPU("A100 SXM 80GB", 80.0, 312.0, 156.0, 19.5, ("A100-SXM4-80GB", "A100 80GB")),
    "A100-40GB": GPU("A100 SXM 40GB", 40.0, 312.0, 156.0, 19.5, ("A100-SXM4-40GB",)),
    "L40S": GPU("L40S 48GB", 45.0, 362.1, 183.0, 91.6, ("L40S",)),
}
# Assumed model-FLOPs utilisation of a diffusion UNet training iteration: typical of SD training
# with fused attention on tensor cores, and of fp32 SIMT convolutions; replace with measurements.
DEFAULT_EFFICIENCY = {"bf16": 0.40, "tf32": 0.40, "fp32": 0.60}


def math_mode(precision: str, tf32: bool) -> str:
    """The kind of math a policy's matmuls and convolutions run in: bf16, tf32 or fp32."""
    return "bf16" if precision == "bf16" else "tf32" if tf32 else "fp32"


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known GPUs are: {', '.join(GPUS)}")
    return GPUS[name]


def measured_efficiency(gpu: GPU, mode: str, results: Path) -> tuple[float, str] | None:
    """Efficiency measured by the newest ``bench.train_step`` result on ``gpu`` in ``mode``, and
    the file it came from; None when no result matches."""
    found = []
    for path in Path(results).glob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not any(m in str(data.get("device", ""))
                                                 for m in gpu.match):
            continue
        policy = data.get("policy") or {}
        rows = [r for r in data.get("rows", []) if r.get("achieved_tflops")]
        if rows and math_mode(policy.get("precision", "fp32"), policy.get("tf32", False)) == mode:
            found.append((path.stat().st_mtime, path, rows))
    if not found:
        return None
    _, path, rows = max(found, key=lambda f: f[0])
    achieved = sum(r["achieved_tflops"] for r in rows) / len(rows)
    return achieved / getattr(gpu, mode), f"{Path(results).name}/{path.name}"


def efficiency(gpu: GPU, mode: str, results: Path | None) -> tuple[float, str]:
    """The efficiency the planner uses for ``gpu`` in ``mode`` and where it comes from."""
    measured = measured_efficiency(gpu, mode, results) if results else None
    if measured:
        return measured[0], f"measured: {measured[1]}"
    return DEFAULT_EFFICIENCY[mode], "default (no benchmark measured on this GPU)"
