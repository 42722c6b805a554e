"""Data-parallel training: the same global batch gives the same update on 1 or 2 processes.

Two CPU processes talk over gloo, launched by torchrun, as on a multi-GPU node with NCCL.

Tolerance: every micro-batch (rows, noise, timesteps) is the same whichever process runs it, so
the only difference is where the micro-batch gradients are summed: by autograd's accumulation in
one process, or by the all-reduce over two. Float addition of two terms is commutative (the
rounded a + b equals the rounded b + a), so with single-threaded kernels the results agree bit
for bit (measured: maximum difference 0.0 in every gradient and weight on a 2-core x86_64 CPU).
The assertion allows 1e-6 relative, a few float32 ulps (2^-24 ~ 6e-8 each) per summand: the error
a different summation order over more processes, or a non-deterministic GPU kernel, could add.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.distributed import Context, micro_generators
from components.embed_cache import CacheConfig, write_cache
from components.methods import Batch
from components.teacher import TextConditioning
from components.training import split_batch
from tests.tiny import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dp_worker.py"
PROMPTS = ["a red circle", "a blue square", "a green triangle on the left", "a yellow circle",
           "a small gray square", "a large white circle"]


def _batch(n: int = 8) -> Batch:
    return Batch(TextConditioning(torch.arange(n * 3.0).view(n, 3, 1)),
                 TextConditioning(torch.zeros(n, 3, 1)), torch.arange(n * 2.0).view(n, 2),
                 torch.Generator().manual_seed(5))


def test_micro_batches_cover_the_global_batch_the_same_way_for_any_process_count():
    single = split_batch(_batch(), 4)
    per_rank = [split_batch(_batch(), 2, Context(r, 2)) for r in range(2)]
    shared = [mb for rank in per_rank for mb in rank]
    for a, b in zip(single, shared, strict=True):
        assert torch.equal(a.z, b.z) and torch.equal(a.cond.text, b.cond.text)
        assert torch.equal(torch.rand(3, generator=a.generator),
                           torch.rand(3, generator=b.generator))
    assert torch.equal(torch.cat([mb.z for mb in single]), _batch().z)


def test_uneven_splits_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        split_batch(_batch(8), 1, Context(0, 3))
    with pytest.raises(ValueError, match="not divisible by grad_accum 3"):
        split_batch(_batch(8), 3, Context(0, 2))
    assert len(micro_generators(torch.Generator(), 2, Context(1, 2))) == 2


def _run(tmp_path: Path, cache: Path, name: str, processes: int, grad_accum: int) -> Path:
    out = tmp_path / name
    out.mkdir()
    args = ["--cache", str(cache), "--out", str(out), "--batch-size", "4",
            "--grad-accum", str(grad_accum), "--steps", "3"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*launcher, str(WORKER), *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    pipe = tiny_pipeline()

    def encode(prompts):
        ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]
    folder = tmp_path_factory.mktemp("dp") / "cache"
    write_cache(folder, PROMPTS, encode, CacheConfig(shard_size=4), "tiny", log=lambda _: None)
    return folder


def test_two_processes_give_the_update_of_one(tmp_path, cache):
    one = _run(tmp_path, cache, "one", processes=1, grad_accum=2)
    two = _run(tmp_path, cache, "two", processes=2, grad_accum=1)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    grads_1, grads_2 = load_file(one / "grads.safetensors"), load_file(two / "grads.safetensors")
    assert sorted(grads_1) == sorted(grads_2) and len(grads_1) == 6  # 3 steps x 2 groups
    # the student's first gradient is 0 (a fresh LoRA equals the teacher); the rest are not
    assert all(grads_1[k].abs().max() > 0 for k in grads_1 if k != "student.0")
    for key in grads_1:
        torch.testing.assert_close(grads_2[key], grads_1[key], rtol=1e-6, atol=1e-9)
    weights_1 = load_file(one / "weights.safetensors")
    weights_2 = load_file(two / "weights.safetensors")
    for key in weights_1:
        torch.testing.assert_close(weights_2[key], weights_1[key], rtol=1e-6, atol=1e-9)
    logs_1 = json.loads((one / "run.json").read_text())["logs"]
    logs_2 = json.loads((two / "run.json").read_text())["logs"]
    for a, b in zip(logs_1, logs_2, strict=True):
        assert a["loss_vsd"] == pytest.approx(b["loss_vsd"], rel=1e-5)
        assert a["grad_norm_student"] == pytest.approx(b["grad_norm_student"], rel=1e-6)
