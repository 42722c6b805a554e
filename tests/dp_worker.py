"""Training runs of tiny methods, for tests/test_distributed.py.

Run as a single process (``python tests/dp_worker.py ...``) or under ``torchrun`` (FSDP2 over
gloo). Each ``--job METHOD CKPT STEPS`` is one run through the real loop and policy, writing its
DCP checkpoints to ``CKPT``; resuming is re-running with a later ``STEPS`` on the same folder.
One launch runs several jobs in turn (starting the processes is the slow part). Every process
also records how many cache rows each of its batch draws read (``rows-<STEPS>-<rank>.json``).

Each group trains with SGD with momentum instead of the method's Adam: Adam divides every
element's gradient by its own magnitude, so an element whose gradient is at rounding-noise level
gets a full learning-rate step of random sign, and any rounding difference (a matmul blocked
differently on differently aligned gathered weights) becomes a difference of the size of the
learning rate. With SGD rounding differences stay rounding-sized, so the comparison can be tight;
the loop, the sharding and the (sharded, per-parameter) optimizer state are the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components import distributed
from components.batches import PairBatches, PromptBatches
from components.embed_cache import EmbeddingCache
from components.generation import seeded_noise
from components.methods import Teacher, get_method
from components.policy import PolicyConfig, TrainingPolicy
from components.teacher import teacher_denoiser
from components.training import LoopConfig, train
from tests.tiny import tiny_pipeline

LATENT = (4, 8, 8)
# Phases split so that four iterations reach every group and phase change.
SETTINGS = {
    "swiftbrush": {"student_lr": 1e-3, "lora_rank": 4, "lora_alpha": 4},
    "dmd2": {"generator_lr": 1e-3, "fake_lr": 1e-3, "gen_update_ratio": 2, "warmup_steps": 2},
    "sid_lsg": {"generator_lr": 1e-3, "fake_lr": 1e-3},
    "instaflow": {"lr": 1e-3, "reflow_fraction": 0.5, "distill_ode_steps": 2,
                  "lpips_fraction": 0.0, "warmup_steps": 0},
    "meng": {"lr": 1e-3, "w_dim": 8, "stage1_fraction": 0.25, "start_steps": 4,
             "final_steps": 1},
}

# SiD-LSG's losses are sums over latent dimensions (its first gradients have norms ~3e4 here):
# at 0.05 its run diverges to NaN within three iterations
SGD_LR = {"sid_lsg": 1e-5}


class Pairs:
    """Eight fixed (noise, sample) pairs: enough for the pair methods' update arithmetic."""

    def __init__(self, prompts: int):
        self.prompt = torch.arange(8) % prompts
        self.x1 = seeded_noise(list(range(500, 508)), LATENT)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return 8

    def prompts(self, idx: torch.Tensor) -> torch.Tensor:
        self.reads.append(len(idx))
        return self.prompt[idx]

    def noise(self, idx: torch.Tensor) -> torch.Tensor:
        return seeded_noise((idx + 100).tolist(), LATENT)

    def samples(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.x1[idx].to(dtype)

    def guidance(self, idx: torch.Tensor) -> None:
        return None  # every pair at one CFG scale


class CountingCache(EmbeddingCache):
    """The embedding cache, counting the rows each read asks for."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.reads: list[int] = []

    def conditioning(self, indices, dtype=torch.float32):
        self.reads.append(len(indices))
        return super().conditioning(indices, dtype)


def run(method_name: str, cache_dir: Path, ckpt: Path, steps: int, args) -> None:
    """One run of ``method_name`` to ``steps`` iterations (resuming from ``ckpt``)."""
    torch.manual_seed(0)  # every process builds the same initial weights (LoRA included)
    pipe = tiny_pipeline()
    cfg_cls, build = get_method(method_name)
    method = build(cfg_cls(**SETTINGS[method_name]), Teacher(teacher_denoiser(pipe)), 4)
    own = method.make_optimizer

    def make_sgd(name: str) -> torch.optim.Optimizer:  # the method's parameters, SGD
        params = [p for group in own(name).param_groups for p in group["params"]]
        return torch.optim.SGD(params, lr=SGD_LR.get(method_name, 0.05), momentum=0.9)
    method.make_optimizer = make_sgd
    cache = CountingCache(cache_dir)
    pairs = Pairs(len(cache))
    batches = (PairBatches(cache, cache.null(1), pairs, LATENT)
               if method.needs_pairs else PromptBatches.from_cache(cache, LATENT))
    logs: list = []
    loop = LoopConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      log_every=1, sample_every=1000, checkpoint_every=2)
    train(method, batches, loop, ckpt, lambda m, s: logs.append({"step": s, **m}),
          lambda module, s: None, policy=TrainingPolicy(PolicyConfig(precision=args.precision)))
    ctx = distributed.context()
    (ckpt / f"rows-{steps}-{ctx.rank}.json").write_text(json.dumps(
        {"embeddings": cache.reads, "pairs": pairs.reads}))
    if ctx.is_main:
        (ckpt / f"logs-{steps}.json").write_text(json.dumps(
            {"world_size": ctx.world_size, "logs": logs}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", nargs=3, action="append", required=True,
                        metavar=("METHOD", "CKPT", "STEPS"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, required=True)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    for method_name, ckpt, steps in args.job:
        run(method_name, args.cache, Path(ckpt), int(steps), args)
    distributed.finish()


if __name__ == "__main__":
    main()
