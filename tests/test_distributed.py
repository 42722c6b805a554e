"""Sharded data parallelism: FSDP2 on 2 processes gives the update of 1 process, and
checkpoints reshard between process counts.

Two CPU processes talk over gloo, launched by torchrun, as on a multi-GPU node with NCCL. For
every method: 1 process x 2 micro-batches and 2 FSDP2 processes x 1 micro-batch train the same
two iterations; then a 1-process run resumes the 2-process checkpoint and must end where the
uninterrupted 1-process run ends (and the reverse for one method).

Tolerance: every micro-batch (rows, noise, timesteps) is the same whichever process runs it, and
FSDP2 gathers the same full weights for the forward, so the only difference is where the two
micro-batch gradients are summed: by autograd's accumulation in one process, or by the
reduce-scatter over two (a sum: the loss is already the global-batch mean). Float addition of two
terms is commutative; what remains is rounding in the matmuls, whose blocking can differ on the
differently aligned weights FSDP2 gathers (measured: at most ~3e-7 relative, a few float32 ulps
(2^-24 ~ 6e-8), on a 2-core x86_64 CPU). The assertion allows 1e-5 relative (and 1e-10
absolute for values at zero), room for a different summation order over more processes; a
wrong scaling, a missed or doubled micro-batch or a skipped update is off by orders of magnitude
more. The worker trains with SGD (``tests/dp_worker.py`` says why Adam cannot be compared
tightly).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from components.distributed import Context, micro_generators
from components.embed_cache import CacheConfig, write_cache
from components.methods import Batch, method_names
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


def _run(cache: Path, method: str, ckpt: Path, processes: int, grad_accum: int,
         steps: int) -> dict:
    args = ["--method", method, "--cache", str(cache), "--ckpt", str(ckpt),
            "--grad-accum", str(grad_accum), "--steps", str(steps)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*launcher, str(WORKER), *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((ckpt / f"logs-{steps}.json").read_text())


def _checkpoint(ckpt: Path, step: int, tmp: Path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint as one flat dict of full tensors (whatever the process count)."""
    out = tmp / f"{ckpt.name}-{step}.pt"
    dcp_to_torch_save(ckpt / f"step-{step:07d}", out)
    return torch.load(out, weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert any(k.startswith("ema/") for k in a) and any(k.startswith("optim/") for k in a)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-10, msg=key)


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


# Only SwiftBrush matches one process under FSDP2 so far; the others differ beyond rounding
# (open, strict so that a fix shows)
OPEN = {"sid_lsg": "FSDP2 update of SiD-LSG differs from 1 process (open)",
        "dmd2": "FSDP2 update of DMD2's fake score differs from 1 process (open)",
        "instaflow": "FSDP2 update of InstaFlow differs from 1 process (open)",
        "meng": "FSDP2 update of Meng et al. differs from 1 process (open)"}


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.xfail(reason=OPEN[m], strict=True)) if m in OPEN else m
    for m in method_names()])
def test_two_fsdp_processes_give_the_update_of_one_and_resume_in_one(tmp_path, cache, method):
    one, two = tmp_path / "one", tmp_path / "two"
    logs_one = _run(cache, method, one, processes=1, grad_accum=2, steps=4)
    logs_two = _run(cache, method, two, processes=2, grad_accum=1, steps=2)
    assert logs_two["world_size"] == 2
    _assert_same(_checkpoint(one, 2, tmp_path), _checkpoint(two, 2, tmp_path))
    for a, b in zip(logs_one["logs"][:2], logs_two["logs"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    # the 2-process checkpoint resumes in 1 process and continues as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    _run(cache, method, resumed, processes=1, grad_accum=2, steps=4)
    final = _checkpoint(one, 4, tmp_path)
    assert any(not torch.equal(final[k], v) for k, v in _checkpoint(one, 2, tmp_path).items())
    _assert_same(final, _checkpoint(resumed, 4, tmp_path))


def test_a_one_process_checkpoint_resumes_in_two(tmp_path, cache):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(cache, "swiftbrush", one, processes=1, grad_accum=2, steps=4)
    shutil.copytree(one, two)
    shutil.rmtree(two / "step-0000004")
    (two / "latest").write_text("step-0000002")
    _run(cache, "swiftbrush", two, processes=2, grad_accum=1, steps=4)
    _assert_same(_checkpoint(one, 4, tmp_path), _checkpoint(two, 4, tmp_path))
