"""The evaluate stage split over 2 gloo processes (torch.distributed.run) gives exactly the
single-process results; bf16 generation is applied and recorded in the eval card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from components.evaluation.sharding import aligned_chunk, shard_indices
from tests.test_protocols import _random_scorer, photos
from tests.tiny import build_tiny_student, build_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
STAGE = ["-m", "pipeline.stages.evaluate", "--root"]


def test_shards_are_whole_batches_covering_every_image_once():
    parts = [shard_indices(11, 3, r, 2) for r in range(2)]
    assert parts == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]
    assert shard_indices(11, 3) == list(range(11))
    assert aligned_chunk(1024, 48) == 1008 and aligned_chunk(10, 64) == 64


def _project(root: Path, precision: str = "fp32") -> Path:
    from pipeline.stages import reference_stats

    params = yaml.safe_load((ROOT / "pipeline" / "presets" / "micro.yaml").read_text())
    (root / "val2017").mkdir(parents=True)
    for i, image in enumerate(photos(6, seed=20)):
        image.save(root / "val2017" / f"{i:012d}.jpg", quality=95)
    captions = {"images": [], "annotations": [
        {"id": i, "image_id": 100 + i, "caption": f"a photo of thing number {i}"}
        for i in range(6)]}
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    (root / "data" / "prompts").mkdir(parents=True)
    (root / "data" / "prompts" / "train.txt").write_text("a red circle\na blue square\n")
    build_tiny_teacher(root / "models" / "teacher")
    build_tiny_student(root / "models" / "student")
    _random_scorer(root / "models" / "scorer")
    params["reference"] = {"images": "val2017", "protocol": "coco2017_5k", "batch_size": 4}
    params["evaluate"] = {
        "protocol": "coco2017_5k", "captions": "annotations/captions_val2017.json",
        "num_images": 5, "teacher_steps": 2, "teacher_guidance_scale": 4.0,
        "curve_guidance_scales": [], "scorer": "models/scorer", "batch_size": 2,
        "grid_images": 3, "latency_repeats": 1, "latency_warmup": 0, "kid": True,
        "precision_recall": True, "precision": precision}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    reference_stats.run(root)
    return root


def _results(root: Path) -> tuple[dict, dict]:
    doc = json.loads((root / "outputs" / "eval" / "eval_card.json").read_text())
    rows = {name: {k: v for k, v in doc[name]["metrics"].items() if k != "latency_s"}
            for name in ("student", "teacher", "teacher_1step")}
    return rows, doc["student"]["card"]


def _set_precision(root: Path, precision: str) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["precision"] = precision
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True,
                   timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_gloo_processes_equal_one_exactly_and_bf16_is_recorded(tmp_path):
    """5 images in batches of 2: rank 0 makes images 0, 1, 4 and rank 1 images 2, 3. Both runs
    use one thread per process (as torchrun sets): kernels' summation order follows threads."""
    one = _project(tmp_path / "one")
    two, half = tmp_path / "two", tmp_path / "half"
    shutil.copytree(one, two)
    shutil.copytree(one, half)
    _run(*STAGE, str(one))
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *STAGE, str(two))
    rows_one, card_one = _results(one)
    rows_two, card_two = _results(two)
    assert rows_one == rows_two  # FID, KID, precision/recall, CLIP score: bit for bit
    assert card_one["processes"] == 1 and card_two["processes"] == 2
    grid = "outputs/eval/grid.png"
    assert (one / grid).read_bytes() == (two / grid).read_bytes()
    _set_precision(half, "bf16")
    _run(*STAGE, str(half))
    rows_half, card_half = _results(half)
    assert card_one["precision"] == "fp32" and card_half["precision"] == "bf16"
    assert all(np.isfinite(rows_half[name]["fid"]) for name in rows_half)
    assert rows_half["teacher"]["fid"] != rows_one["teacher"]["fid"]  # bf16 was really used
