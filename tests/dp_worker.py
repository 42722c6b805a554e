"""One data-parallel training run of the tiny SwiftBrush setup, for tests/test_distributed.py.

Run as a single process (``python tests/dp_worker.py ...``) or under ``torchrun``; rank 0 writes
the gradients each optimizer step received (after the cross-process sum), the final student and
LoRA weights and the logged metrics to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file

from components import distributed
from components.batches import PromptBatches
from components.embed_cache import EmbeddingCache
from components.methods import Teacher, get_method
from components.methods.swiftbrush import SwiftBrushConfig
from components.teacher import teacher_denoiser
from components.training import LoopConfig, train
from tests.tiny import tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    ctx = distributed.context()
    torch.manual_seed(1000 + ctx.rank)  # LoRA init differs per rank until broadcast from rank 0
    pipe = tiny_pipeline()
    _, build = get_method("swiftbrush")
    method = build(SwiftBrushConfig(student_lr=1e-3, lora_rank=4, lora_alpha=4),
                   Teacher(teacher_denoiser(pipe)), args.steps)
    grads: dict[str, torch.Tensor] = {}
    make_optimizer = method.make_optimizer

    def recording_optimizer(group: str) -> torch.optim.Optimizer:
        opt = make_optimizer(group)

        def record(optimizer, *_):
            flat = torch.cat([p.grad.reshape(-1) for g in optimizer.param_groups
                              for p in g["params"] if p.grad is not None])
            grads[f"{group}.{len(grads)}"] = flat.clone()
        opt.register_step_pre_hook(record)
        return opt

    method.make_optimizer = recording_optimizer
    logs: list = []
    loop = LoopConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      log_every=1, sample_every=1000, checkpoint_every=1000)
    train(method, PromptBatches.from_cache(EmbeddingCache(args.cache), (4, 8, 8)), loop,
          args.out / f"ckpt-{ctx.rank}",
          lambda m, s: logs.append({"step": s, **m}), lambda module, s: None)
    if ctx.is_main:
        save_file(grads, str(args.out / "grads.safetensors"))
        weights = {f"student.{k}": v.contiguous() for k, v in method.student().state_dict().items()}
        weights |= {f"lora.{n}": p.detach().contiguous()
                    for n, p in method.shared.named_parameters() if p.requires_grad}
        save_file(weights, str(args.out / "weights.safetensors"))
        (args.out / "run.json").write_text(json.dumps({"world_size": ctx.world_size,
                                                       "logs": logs}))
    distributed.finish()


if __name__ == "__main__":
    main()
