"""Build a random-weight diffusion pipeline with a real architecture (nothing downloaded).

    python -m pipeline.build_sd --arch sd15 --out models/sd15-random
    python -m pipeline.build_sd --arch sdxl --out /tmp/sdxl-small --divisor 8
    python -m pipeline.build_sd --arch sd35m --out /tmp/sd35m-small --divisor 16 --no-t5
    python -m pipeline.build_sd --arch flux1 --out /tmp/flux1-small --divisor 16
    python -m pipeline.build_sd --arch sana --out /tmp/sana-small --divisor 16

UNets: sd15, sd21, sdxl; flow transformers: sd35m (SD3.5 Medium), sd35l (SD3.5 Large), flux1
(FLUX.1-dev), sana (SANA 1.6B, 1024 px) and sana600m (SANA 0.6B, 1024 px). ``--no-t5`` leaves
out SD3's T5 encoder (SD3 runs without it).

The folder is a diffusers pipeline that ``components.teacher.load_pipeline`` (and so
``teacher.model`` in params.yaml) loads: for benchmarks at SD scale and tests of the real code
paths without the released weights. ``--divisor`` narrows every width, keeping the topology.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from components.architectures import ARCHS, DIVISORS, build_pipeline, count_unet_parameters
from components.flow_architectures import (
    FLOW_ARCHS,
    FLOW_DIVISORS,
    build_flow_pipeline,
    count_transformer_parameters,
)
from components.io import atomic_dir
from pipeline import env

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build(arch: str, out: Path, divisor: int = 1, seed: int = 0, dtype: str = "float32",
          t5: bool = True) -> Path:
    """Write the pipeline folder ``out`` atomically and return it."""
    if arch in FLOW_ARCHS:
        pipe = build_flow_pipeline(arch, divisor, seed, DTYPES[dtype], t5=t5)
    else:
        pipe = build_pipeline(arch, divisor, seed, DTYPES[dtype])
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.build_sd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS + FLOW_ARCHS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--divisor", type=int, choices=sorted(set(DIVISORS + FLOW_DIVISORS)),
                        default=1, help="divide every width by this (1: the real size; 16 for "
                        "flow transformers only)")
    parser.add_argument("--no-t5", action="store_true", help="SD3.5 without its T5 encoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    env.configure(".")
    if args.arch in FLOW_ARCHS:
        if args.divisor not in FLOW_DIVISORS:
            parser.error(f"--divisor for {args.arch} must be one of {FLOW_DIVISORS}")
        n, what = count_transformer_parameters(args.arch, args.divisor), "transformer"
    else:
        if args.divisor not in DIVISORS:
            parser.error(f"--divisor for {args.arch} must be one of {DIVISORS}")
        n, what = count_unet_parameters(args.arch, args.divisor), "UNet"
    print(f"building {args.arch} (divisor {args.divisor}, {what} {n / 1e6:.1f} M parameters)")
    build(args.arch, args.out, args.divisor, args.seed, args.dtype, t5=not args.no_t5)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
