"""Stage cache_teacher on a tiny teacher: teacher pairs only for methods that train on them, and
the same cache files from 2 gloo processes (torch.distributed.run) as from 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.io import read_json
from components.methods import method_names, needs_pairs
from pipeline.stages import cache_teacher
from tests.tiny import build_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


def _project(root: Path, method: str) -> Path:
    data = yaml.safe_load((ROOT / "pipeline/presets/micro.yaml").read_text())
    data["distill"]["method"] = method
    data["cache"].update(shard_size=4, dtype="float16")
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    (root / "data/prompts").mkdir(parents=True)
    (root / "data/prompts/train.txt").write_text(
        "\n".join(f"a {c} circle" for c in ("red", "green", "blue", "gray", "black", "white",
                                             "pink", "brown", "cyan", "lime")) + "\n")
    build_tiny_teacher(root / "models/teacher")
    return root


def test_only_pair_methods_need_pairs():
    assert {m for m in method_names() if needs_pairs(m)} == {"instaflow", "meng"}


@pytest.mark.parametrize("method,count", [("sid_lsg", 0), ("instaflow", 8)])
def test_pairs_are_made_only_for_methods_that_train_on_them(tmp_path, method, count):
    root = _project(tmp_path, method)
    cache_teacher.run(root)
    pairs = read_json(root / "data/pairs/index.json")
    assert pairs["count"] == count and len(pairs["shards"]) == count // 4
    cache = read_json(root / "data/cache/index.json")
    assert cache["count"] == 10 and cache["dtype"] == "float16" and len(cache["shards"]) == 3


def _files(folder: Path) -> dict:
    index = read_json(folder / "index.json")
    return {s["file"]: s["sha256"] for s in index["shards"]}


def test_two_gloo_processes_write_the_same_caches_as_one(tmp_path):
    """Exact: shard k is made whole by one process from its own rows' seeds; both runs use one
    thread per process (as torchrun sets), since kernels' summation order follows threads."""
    one = _project(tmp_path / "one", "instaflow")
    two = _project(tmp_path / "two", "instaflow")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stage = ["-m", "pipeline.stages.cache_teacher", "--root"]
    subprocess.run([sys.executable, *stage, str(one)], cwd=ROOT, check=True, env=env,
                   capture_output=True, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", *stage, str(two)], cwd=ROOT, check=True, env=env,
                   capture_output=True, timeout=600)
    for folder in ("data/cache", "data/pairs"):
        assert _files(one / folder) == _files(two / folder), folder
        assert len(_files(one / folder)) >= 2
