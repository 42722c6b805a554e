"""The training policy on the tiny tier: bf16 trains; bad input fails before weights load;
the torchrun launcher stops its processes when its caller dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from components.config import ConfigError
from components.methods import Teacher, get_method
from components.policy import PolicyConfig, TrainingPolicy, blocks
from components.teacher import teacher_denoiser
from components.training import LoopConfig, train
from pipeline.launch import torchrun_command
from pipeline.params import load_stage
from tests.dp_worker import SETTINGS, Pairs
from tests.test_distributed import PROMPTS
from tests.tiny import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from components.embed_cache import CacheConfig, EmbeddingCache, write_cache

    pipe = tiny_pipeline()

    def encode(prompts):
        ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]
    folder = tmp_path_factory.mktemp("policy") / "cache"
    write_cache(folder, PROMPTS, encode, CacheConfig(shard_size=4), "tiny", log=lambda _: None)
    return EmbeddingCache(folder)


@pytest.mark.parametrize("name", ["sid_lsg", "swiftbrush", "meng"])
def test_a_bf16_run_trains_with_fp32_masters_and_bf16_frozen_weights(name, cache, tmp_path):
    from components.batches import PairBatches, PromptBatches

    torch.manual_seed(0)
    cfg_cls, build = get_method(name)
    method = build(cfg_cls(**SETTINGS[name]), Teacher(teacher_denoiser(tiny_pipeline())), 4)
    before = {k: v.clone() for k, v in method.student().state_dict().items()}
    batches = (PairBatches(cache, cache.null(1), Pairs(len(cache)), (4, 8, 8))
               if method.needs_pairs else PromptBatches.from_cache(cache, (4, 8, 8)))
    logs: list = []
    policy = TrainingPolicy(PolicyConfig(precision="bf16", activation_checkpointing=True))
    ema = train(method, batches, LoopConfig(steps=3, batch_size=4, log_every=1,
                                            checkpoint_every=3, sample_every=100),
                tmp_path, lambda m, s: logs.append(m), lambda module, s: None, policy=policy)
    trained = {id(p) for g in method.groups for p in method.parameters(g.name)}
    for module in method.state_modules().values():
        for n, p in module.named_parameters():
            want = torch.float32 if id(p) in trained else torch.bfloat16
            assert p.dtype == want, (n, p.dtype)
    assert all(v.dtype == torch.float32 for v in (ema.shadow or {}).values())
    assert all(torch.isfinite(torch.tensor(v)) for log in logs for v in log.values())
    after = method.student().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert policy.describe()["precision"] == "bf16"


def test_sharding_units_are_the_outer_unet_blocks():
    net = teacher_denoiser(tiny_pipeline())
    units = list(blocks(net))
    unet = net.unet
    assert units == [*unet.down_blocks, *unet.up_blocks, unet.mid_block]


def _params(tmp_path: Path, **distill) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in distill.items():
        section = params["distill"]
        *path, last = key.split(".")
        for p in path:
            section = section[p]
        section[last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


@pytest.mark.parametrize("change,message", [
    ({"policy.precision": "fp8"},
     "distill.policy.precision 'fp8' is unknown; valid precisions are: fp32, bf16"),
    ({"processes": 3}, "distill.loop.batch_size 32 over 3 process(es) gives 10.6667 per process"),
    ({"processes": 2, "loop.grad_accum": 4, "loop.batch_size": 36},
     "gives 18 per process, not divisible into grad_accum 4 micro-batches"),
])
def test_bad_policy_input_is_one_clear_error_at_load(tmp_path, change, message):
    root = _params(tmp_path, **change)
    with pytest.raises(ConfigError) as err:
        load_stage(root, "distill")
    assert message in str(err.value)


def test_more_processes_than_gpus_fails_before_any_weight_loads(tmp_path):
    root = _params(tmp_path, processes=64, device="cuda", **{"loop.batch_size": 64})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pipeline.stages.distill", "--root", str(root)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: error")]
    assert lines == [("distill: error: distill.processes is 64 but 0 GPU(s) are visible; set "
                      "distill.processes to at most the GPU count (or CUDA_VISIBLE_DEVICES)")]


def test_the_launcher_runs_torchrun_and_its_workers_die_with_the_caller(tmp_path):
    """A caller killed outright (SIGKILL, as a cancelled flow run's process) takes torchrun and
    its workers with it."""
    assert torchrun_command("pipeline.stages.distill", tmp_path, 4)[1:5] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    pids = tmp_path / "pids"
    worker = tmp_path / "sleeper.py"
    worker.write_text("import os, sys, time\n"
                      f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
                      "time.sleep(600)\n")
    caller = ("import sys; from pathlib import Path; import pipeline.launch as l\n"
              f"l.torchrun_command = lambda m, r, n: [sys.executable, '-m', "
              f"'torch.distributed.run', '--standalone', '--nproc-per-node=2', {str(worker)!r}]\n"
              f"l.torchrun('x', Path({str(tmp_path)!r}), 2)\n")
    proc = subprocess.Popen([sys.executable, "-c", caller], cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(_lines(pids)) < 2:
        time.sleep(0.5)
    workers = [int(p) for p in _lines(pids)]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.5)
    assert not any(_alive(p) for p in workers)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
