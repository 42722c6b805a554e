"""Sharded data parallelism: FSDP2 on 2 processes gives the update of 1 process, and
checkpoints reshard between process counts.

Two CPU processes talk over gloo, launched by torchrun, as on a multi-GPU node with NCCL. For
every method: 1 process x 2 micro-batches and 2 FSDP2 processes x 1 micro-batch train the same
two iterations; then a 1-process run resumes the 2-process checkpoint and must end where the
uninterrupted 1-process run ends (and the reverse for one method). Each process reads only its
rows of the batch from the caches.

What differs, and why it is not exact. Every micro-batch (rows, noise, timesteps, dropout) is
the same whichever process runs it, FSDP2 gathers the same full weights, and the first update's
per-sample losses are bitwise equal. Its gradients are not: FSDP2 hooks every sharded block's
inputs with an autograd node, so where a tensor feeds several consumers (a block's input also
feeds the skip connection and the residual; the time embedding feeds every block) autograd adds
the same gradient terms in another grouping, (a + b) + c instead of a + (b + c). Measured on a
2-core x86_64 CPU, torch 2.13: FSDP2 over a *1-process* group gives gradients bitwise equal to
the 2 processes' (DMD2 and SiD-LSG, every parameter), while the plain 1-process loop differs
from both by ~1e-7 relative in the blocks below the bottleneck; InstaFlow and Meng clip with a
norm summed over shards, which rounds differently too. Nothing in the methods differs (no
per-process randomness or normalisation); what is left is float associativity.

Tolerance. Each tensor (weights, EMA, SGD momentum = accumulated gradients) must agree to
``TOLERANCE`` of its own largest entry, so a gradient is compared on its own scale, not on
the weights'. Measured worst, after 2 iterations / after the 2-process checkpoint resumed to 4:
DMD2 3.2e-6 / 3.8e-5, InstaFlow 2.2e-6 / 1.2e-5, Meng 5.5e-6 / 2.4e-5, SwiftBrush 1.3e-6 /
8.1e-7, SiD-LSG 3.2e-4 / 2.1e-4: SiD's generator gradient is weighted by y_real - y_fake, the
difference of two networks that start as copies of each other, so rounding relative to y grows
relative to that difference (its momentum differs by 1.2e-4 in norm, the others' by <= 2e-6).
The bounds below are ~3x those figures; a wrong scaling, a missed or doubled micro-batch or a
skipped update is off by 0.5 or more. The worker trains with SGD (``tests/dp_worker.py`` says why
Adam cannot be compared tightly).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from components.batches import PairBatches, PromptBatches
from components.distributed import Context, local_rows, micro_generators
from components.embed_cache import CacheConfig, EmbeddingCache, write_cache
from components.methods import Batch, method_names
from components.teacher import TextConditioning
from components.training import draw_batch, split_batch
from tests.dp_worker import LATENT, Pairs
from tests.tiny import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dp_worker.py"
TOLERANCE = {"sid_lsg": 1e-3}  # relative to each tensor's largest entry; module docstring
DEFAULT_TOLERANCE = 1e-4
PROMPTS = ["a red circle", "a blue square", "a green triangle on the left", "a yellow circle",
           "a small gray square", "a large white circle"]


def _batch(n: int = 8) -> Batch:
    return Batch(TextConditioning(torch.arange(n * 3.0).view(n, 3, 1)),
                 TextConditioning(torch.zeros(n, 3, 1)), torch.arange(n * 2.0).view(n, 2),
                 torch.Generator().manual_seed(5))


def test_micro_batches_cover_the_global_batch_the_same_way_for_any_process_count():
    single = split_batch(_batch(), 4)
    per_rank = [split_batch(_batch().rows(local_rows(8, Context(r, 2))), 2, Context(r, 2))
                for r in range(2)]
    shared = [mb for rank in per_rank for mb in rank]
    for a, b in zip(single, shared, strict=True):
        assert torch.equal(a.z, b.z) and torch.equal(a.cond.text, b.cond.text)
        assert torch.equal(torch.rand(3, generator=a.generator),
                           torch.rand(3, generator=b.generator))
    assert torch.equal(torch.cat([mb.z for mb in single]), _batch().z)


def test_uneven_splits_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        draw_batch(lambda *a, **k: _batch(8), 8, torch.Generator(), 0, Context(0, 3))
    with pytest.raises(ValueError, match="not divisible by grad_accum 3"):
        split_batch(_batch(4), 3, Context(0, 2))
    assert len(micro_generators(torch.Generator(), 2, Context(1, 2))) == 2


def test_a_process_batch_is_its_rows_of_the_global_batch(cache):
    embeddings = EmbeddingCache(cache)
    pairs = Pairs(len(embeddings))
    for source in (PromptBatches.from_cache(embeddings, LATENT),
                   PairBatches(embeddings, embeddings.null(1), pairs, LATENT)):
        whole = draw_batch(source, 8, torch.Generator().manual_seed(3), 0)
        after = torch.rand(2, generator=whole.generator)
        for rank in range(2):
            gen = torch.Generator().manual_seed(3)
            part = draw_batch(source, 8, gen, 0, Context(rank, 2))
            rows = slice(4 * rank, 4 * rank + 4)
            assert torch.equal(part.z, whole.z[rows]) and part.uncond.text.shape[0] == 4
            assert torch.equal(part.cond.text, whole.cond.text[rows])
            if part.x1 is not None:
                assert torch.equal(part.x1, whole.x1[rows])
            # the generator advanced as for the whole batch (later draws agree on every rank)
            assert torch.equal(torch.rand(2, generator=gen), after)
    assert pairs.reads == [8, 4, 4]


def _launch(cache: Path, jobs: list[tuple[str, Path, int]], processes: int) -> None:
    """One launch of the worker running ``jobs`` (method, checkpoint folder, steps) in turn:
    1 process x 2 micro-batches, or ``processes`` FSDP2 processes x 1 micro-batch each."""
    args = ["--cache", str(cache), "--grad-accum", str(2 if processes == 1 else 1)]
    for method, ckpt, steps in jobs:
        args += ["--job", method, str(ckpt), str(steps)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*launcher, str(WORKER), *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _logs(ckpt: Path, steps: int) -> dict:
    return json.loads((ckpt / f"logs-{steps}.json").read_text())


def _checkpoint(ckpt: Path, step: int, tmp: Path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint as one flat dict of full tensors (whatever the process count)."""
    out = tmp / f"{ckpt.name}-{step}.pt"
    dcp_to_torch_save(ckpt / f"step-{step:07d}", out)
    return torch.load(out, weights_only=True)


def _assert_same(a: dict, b: dict, tolerance: float = DEFAULT_TOLERANCE) -> None:
    """Every tensor of two checkpoints equal up to ``tolerance`` of its own largest entry."""
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optim/") for k in a)
    for key, value in a.items():
        if not value.is_floating_point():
            assert torch.equal(b[key], value), key
            continue
        scale = float(value.abs().max())
        torch.testing.assert_close(b[key], value, rtol=0, atol=tolerance * scale + 1e-30,
                                   msg=lambda m, key=key: f"{key}: {m}")


def _write_cache(folder: Path) -> Path:
    pipe = tiny_pipeline()

    def encode(prompts):
        ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]
    write_cache(folder, PROMPTS, encode, CacheConfig(shard_size=4), "tiny", log=lambda _: None)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return _write_cache(tmp_path_factory.mktemp("dp") / "cache")


def _train_every_method(root: Path) -> None:
    """Every method trained three ways, in three launches: 1 process to 4 iterations (``one``),
    2 FSDP2 processes to 2 (``two``), and ``two``'s checkpoint resumed in 1 process to 4
    (``resumed``); plus SwiftBrush's 1-process checkpoint at 2 resumed in 2 processes
    (``back``)."""
    cache = _write_cache(root / "cache")
    methods = method_names()
    _launch(cache, [(m, root / "one" / m, 4) for m in methods], processes=1)
    back = root / "back" / "swiftbrush"
    shutil.copytree(root / "one" / "swiftbrush", back)
    shutil.rmtree(back / "step-0000004")
    (back / "latest").write_text("step-0000002")
    _launch(cache, [*[(m, root / "two" / m, 2) for m in methods], ("swiftbrush", back, 4)],
            processes=2)
    for m in methods:
        shutil.copytree(root / "two" / m, root / "resumed" / m)
    _launch(cache, [(m, root / "resumed" / m, 4) for m in methods], processes=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, worker_id) -> Path:
    """The runs of ``_train_every_method``, made once per test session. The project's
    ``--dist loadfile`` keeps this module on one worker; should its tests be spread over workers
    (``--dist load``), the first one to need the runs trains them in the session's shared folder
    while the others wait on a file lock."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "dp-runs"
    with FileLock(f"{root}.lock"):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            _train_every_method(root)
            (root / "done").touch()
    return root


@pytest.mark.parametrize("method", method_names())
def test_two_fsdp_processes_give_the_update_of_one_and_resume_in_one(runs, tmp_path, method):
    one, two, resumed = (runs / kind / method for kind in ("one", "two", "resumed"))
    logs_one, logs_two = _logs(one, 4), _logs(two, 2)
    tolerance = TOLERANCE.get(method, DEFAULT_TOLERANCE)
    assert logs_two["world_size"] == 2
    _assert_same(_checkpoint(one, 2, tmp_path), _checkpoint(two, 2, tmp_path), tolerance)
    for log in logs_one["logs"]:  # a run that diverged would compare NaNs
        assert all(math.isfinite(v) for v in log.values()), log
        assert all(v == 0 for k, v in log.items() if k.startswith("dropped_")), log
    for a, b in zip(logs_one["logs"][:2], logs_two["logs"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=tolerance, abs=1e-7), key
    # the 2-process checkpoint resumes in 1 process and continues as the uninterrupted run
    final = _checkpoint(one, 4, tmp_path)
    assert any(not torch.equal(final[k], v) for k, v in _checkpoint(one, 2, tmp_path).items())
    _assert_same(final, _checkpoint(resumed, 4, tmp_path), tolerance)


def test_a_one_process_checkpoint_resumes_in_two(runs, tmp_path):
    one, back = runs / "one" / "swiftbrush", runs / "back" / "swiftbrush"
    _assert_same(_checkpoint(one, 4, tmp_path), _checkpoint(back, 4, tmp_path))


@pytest.mark.parametrize("method", method_names())
def test_each_process_reads_only_its_share_of_the_batch_rows(runs, method):
    """Batch size 4: one process reads 4 rows a draw, each of 2 processes 2 (never all 4)."""
    def reads(folder: Path, steps: int, rank: int) -> dict:
        return json.loads((folder / f"rows-{steps}-{rank}.json").read_text())
    single = reads(runs / "one" / method, 4, 0)
    assert single["embeddings"] and set(single["embeddings"]) == {4}
    for rank in range(2):
        shares = reads(runs / "two" / method, 2, rank)
        assert shares["embeddings"] and set(shares["embeddings"]) == {2}
        assert set(shares["pairs"]) == ({2} if single["pairs"] else set())
