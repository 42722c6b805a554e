"""Training-iteration speed and memory of every registered method at Stable Diffusion scale.

    python -m bench.train_step                                   # CUDA: SD1.5, B = 1 2 4 8
    python -m bench.train_step --precision bf16 --activation-checkpointing --fused-optimizer \
        --tf32 --compile                                         # the distill.policy switches
    python -m bench.train_step --device cpu                      # CPU: SD1.5 topology, widths / 8

One iteration is exactly what the distill stage's loop runs at a step where every group updates:
the loop's training policy (``components.policy``, the ``distill.policy`` keys) prepares the
method's networks and optimizers, then ``components.training.update_group`` runs per group, in
the method's order, on a random-weight UNet with the real architecture
(``components.architectures``). Reported per method and batch size:
seconds per iteration, images per second, peak memory, model FLOPs per iteration (counted by
``torch.utils.flop_counter`` on one iteration: every matmul, convolution and attention, forward and
backward) and model-FLOPs utilisation against ``--peak-tflops`` (default: the device's dense bf16
peak where known). Speed levers are switches; method code is never changed.
Prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from components.architectures import ARCHS, DIVISORS, scheduler_config, unet_config
from components.diffusion import NoiseSchedule
from components.methods import Batch, Teacher, get_method, method_names
from components.policy import PRECISIONS, PolicyConfig, TrainingPolicy
from components.teacher import TextConditioning, UNetDenoiser
from components.training import update_group

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_method(name: str, arch: str, divisor: int, device: torch.device, levers: dict):
    """The method with its published defaults on a random-weight UNet of ``arch``."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(arch, divisor)).to(device)
    if levers["attention"] == "eager":
        unet.set_attn_processor(AttnProcessor())
    scheduler_cfg = scheduler_config(arch)
    schedule = NoiseSchedule.from_scheduler(DDIMScheduler(**scheduler_cfg))
    teacher = Teacher(UNetDenoiser(unet, schedule, scheduler_cfg.get("prediction_type",
                                                                     "epsilon")))
    cfg_cls, factory = get_method(name)
    # published defaults, except InstaFlow's LPIPS phase, whose backbone weights are not here
    cfg = cfg_cls(lpips_fraction=0.0) if name == "instaflow" else cfg_cls()
    method = factory(cfg, teacher, 1000)
    for module in method.state_modules().values():
        if levers["channels_last"]:
            module.to(memory_format=torch.channels_last)
    return method


def random_batch(arch: str, divisor: int, batch: int, latent: int, device: torch.device,
                 seed: int) -> Batch:
    """Random prompt embeddings (and SDXL's pooled embeddings and time ids) and noise."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet_config(arch, divisor)
    dim = cfg["cross_attention_dim"]

    def cond() -> TextConditioning:
        text = torch.randn(batch, 77, dim, generator=gen)
        if arch != "sdxl":
            return TextConditioning(text).to(device)
        pooled = torch.randn(batch, 1280 // divisor, generator=gen)
        size = float(latent * 8)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]).expand(batch, 6)
        return TextConditioning(text, pooled, time_ids.contiguous()).to(device)

    z = torch.randn(batch, 4, latent, latent, generator=gen).to(device)
    x1 = torch.randn(batch, 4, latent, latent, generator=gen).to(device)  # pair methods' sample
    return Batch(cond(), cond(), z, gen, 0, x1)


def iteration(method, opts: dict, batch: Batch, policy: TrainingPolicy) -> None:
    """One training iteration in which every group updates once."""
    scratch = [{}]
    for group in method.groups:
        update_group(method, group, opts[group.optimizer_name], [batch], scratch, batch.z.shape[0], policy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, args, batch_size: int, device: torch.device, levers: dict) -> dict:
    method = build_method(name, args.arch, args.divisor, device, levers)
    policy = TrainingPolicy(args.policy)
    opts = policy.prepare(method)
    batches = [random_batch(args.arch, args.divisor, batch_size, args.latent, device, s)
               for s in range(2)]
    for k in range(args.warmup):
        iteration(method, opts, batches[k % 2], policy)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for k in range(args.iters):
        iteration(method, opts, batches[k % 2], policy)
    _sync(device)
    seconds = (time.perf_counter() - start) / args.iters
    with FlopCounterMode(display=False) as counter:
        iteration(method, opts, batches[0], policy)
    flops = counter.get_total_flops()
    peak = args.peak_tflops or peak_tflops(device)
    achieved = flops / seconds / 1e12
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # process high-water mark: grows monotonically over the run's configurations
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {"method": name, "batch": batch_size, "iter_s": round(seconds, 6),
           "images_per_s": round(batch_size / seconds, 3), "peak_mem_gib": round(memory, 3),
           "flop_per_iter": flops, "achieved_tflops": round(achieved, 6),
           "mfu": round(achieved / peak, 6) if peak else None}
    del method, opts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict], memory_label: str) -> str:
    head = ("| method | batch | s / iter | images / s | " + memory_label
            + " | TFLOP / iter | TFLOP/s | MFU |")
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        lines.append(f"| {r['method']} | {r['batch']} | {r['iter_s']:.4f} | "
                     f"{r['images_per_s']:.2f} | {r['peak_mem_gib']:.2f} | "
                     f"{r['flop_per_iter'] / 1e12:.4g} | {r['achieved_tflops']:.4g} | {mfu} |")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=ARCHS, default="sd15")
    p.add_argument("--divisor", type=int, choices=DIVISORS,
                   help="width divisor (default: 1 on CUDA, 8 on CPU)")
    p.add_argument("--latent", type=int, help="latent side (default: 64 = 512 px on CUDA, 8 on "
                   "CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", help="default: every registered method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known bf16)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="distill.policy")
    p.add_argument("--activation-checkpointing", action="store_true", help="distill.policy")
    p.add_argument("--fused-optimizer", action="store_true", help="distill.policy")
    p.add_argument("--tf32", action="store_true", help="distill.policy")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="distill.policy: torch.compile")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", type=Path, default=Path("bench/results/train_step.json"))
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.divisor = args.divisor or (1 if cuda else 8)
    args.latent = args.latent or (64 if cuda else 8)
    args.batch_sizes = args.batch_sizes or ([1, 2, 4, 8] if cuda else [1, 2, 4])
    args.policy = PolicyConfig(precision=args.precision,
                               activation_checkpointing=args.activation_checkpointing,
                               compile=args.compile, fused_optimizer=args.fused_optimizer,
                               tf32=args.tf32)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    levers = {"attention": args.attention, "channels_last": args.channels_last}
    names = args.methods or method_names()
    rows = []
    for name in names:
        for b in args.batch_sizes:
            rows.append(measure(name, args, b, device, levers))
            print(f"{name} B={b}: {rows[-1]['iter_s']:.4f} s/iter", flush=True)
    label = "peak GiB (allocated)" if device.type == "cuda" else "peak RSS GiB (process)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    result = {"device": name, "torch": torch.__version__, "arch": args.arch,
              "divisor": args.divisor, "latent": args.latent, "levers": levers,
              "policy": TrainingPolicy(args.policy).describe(),
              "warmup": args.warmup, "iters": args.iters,
              "peak_tflops": args.peak_tflops or peak_tflops(device), "rows": rows}
    print(f"\n{args.arch} (width divisor {args.divisor}, latents {args.latent}x{args.latent}) "
          f"on {name}, levers {levers}\npolicy {result['policy']}\n")
    print(table(rows, label))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
