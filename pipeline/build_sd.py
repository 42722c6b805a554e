"""Build a random-weight Stable Diffusion pipeline with a real architecture (nothing downloaded).

    python -m pipeline.build_sd --arch sd15 --out models/sd15-random
    python -m pipeline.build_sd --arch sdxl --out /tmp/sdxl-small --divisor 8

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
from components.io import atomic_dir
from pipeline import env

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build(arch: str, out: Path, divisor: int = 1, seed: int = 0, dtype: str = "float32") -> Path:
    """Write the pipeline folder ``out`` atomically and return it."""
    pipe = build_pipeline(arch, divisor, seed, DTYPES[dtype])
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.build_sd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--divisor", type=int, choices=DIVISORS, default=1,
                        help="divide every width by this (1: the real size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    env.configure(".")
    n = count_unet_parameters(args.arch, args.divisor)
    print(f"building {args.arch} (divisor {args.divisor}, UNet {n / 1e6:.1f} M parameters)")
    build(args.arch, args.out, args.divisor, args.seed, args.dtype)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
