"""The distill stage's pre-flight: the plan is made before any weight loads, and a GPU with less
free memory than the planned peak stops the stage with the plan's suggestion. No GPU here: the
CUDA queries (``torch.cuda.mem_get_info``, the device name) report a small, fake GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel

from components.architectures import scheduler_config
from components.planning.estimate import GIB
from pipeline.params import load_stage
from pipeline.plan import preflight
from pipeline.stages import distill
from tests.test_plan import TINY_UNET

ROOT = Path(__file__).resolve().parents[1]


def _project(root: Path) -> Path:
    """The micro preset on the tiny UNet's configs (no weights: nothing may load them), on
    ``cuda``, with a micro-batch large enough that its activations dominate."""
    teacher = root / "models" / "teacher"
    UNet2DConditionModel.from_config(TINY_UNET).save_config(teacher / "unet")
    DDIMScheduler(**scheduler_config("sd15")).save_config(teacher / "scheduler")
    data = yaml.safe_load((ROOT / "pipeline/presets/micro.yaml").read_text())
    data["teacher"]["model"] = "models/teacher"
    data["distill"].update(device="cuda", method="sid_lsg")
    data["distill"]["loop"].update(batch_size=2048, grad_accum=1)
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    return root


def _fake_gpu(monkeypatch, free_gib: float) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (int(free_gib * GIB), int(80 * GIB)))


def test_the_stage_refuses_a_gpu_with_too_little_free_memory(tmp_path, monkeypatch):
    root = _project(tmp_path)
    configs = load_stage(root, "distill")
    _fake_gpu(monkeypatch, 80.0)
    plan = preflight(root, configs["teacher"], configs["distill"], "cuda")
    assert plan["fits"] and plan["gpu"]["name"] == "H100 SXM 80GB"
    need, per_image = plan["memory_gib"]["total"], plan["recommendation"]["gib_per_image"]
    base = need - 2048 * per_image
    assert per_image > 0 and base > 0.9  # the CUDA context, the state
    free = (base + 1024 * per_image) / 0.9  # half the micro-batch fits in it, with headroom
    assert free < need
    _fake_gpu(monkeypatch, free)
    with pytest.raises(ValueError) as refused:
        distill.run(root)  # before anything is read or loaded (no prompts, no cache here)
    message = str(refused.value)
    assert f"needs {need:.1f} GiB per GPU" in message and f"{free:.1f} GiB free" in message
    assert "use micro-batch" in message and "gradient accumulation" in message
    assert not (root / "checkpoints").exists()
