"""Encode a folder of captioned images into a real-latents file for DMD2's GAN term.

    python -m pipeline.real_latents --teacher models/teacher --images data/real \\
        --out data/real_latents.safetensors

The folder holds the images and ``captions.json`` (``{"file name": "caption", ...}``; another
file with ``--captions``). Each image is resized and centre-cropped to the teacher's resolution,
encoded with the teacher's VAE, and stored with its own caption's text conditioning from the
teacher's text encoder(s) (format: ``components/real_latents.py``). Point
``distill.methods.dmd2.real_latents`` at the output.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from components.real_latents import encode_images, read_captions, save_real_latents
from components.teacher import TeacherConfig, load_pipeline, resolve_model
from pipeline import env


def build(teacher: str, images: Path, out: Path, captions: Path | None = None,
          batch_size: int = 16, device: str = "cpu", seed: int = 0) -> int:
    """Write ``out`` and return the number of images encoded."""
    from diffusers import UNet2DConditionModel

    table = read_captions(images, captions)
    names = sorted(table)
    cfg = TeacherConfig(model=teacher)
    size = UNet2DConditionModel.load_config(resolve_model(teacher, Path(".")),
                                            subfolder="unet")["sample_size"]
    latent_hw = (size, size) if isinstance(size, int) else tuple(size)
    pipe = load_pipeline(cfg, Path("."), unet=None).to(device)  # the VAE and text encoders
    data = encode_images(pipe, [images / n for n in names], [table[n] for n in names],
                         latent_hw, batch_size, seed)
    save_real_latents(out, data)
    return len(data)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.real_latents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher",
                        help="teacher pipeline folder or hub id (as `teacher.model`)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--captions", type=Path, default=None,
                        help="JSON {file name: caption} (default: <images>/captions.json)")
    parser.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior samples")
    args = parser.parse_args(argv)
    env.configure(".")
    try:
        n = build(args.teacher, args.images, args.out, args.captions, args.batch_size,
                  args.device, args.seed)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"real_latents: error: {err}") from None
    print(f"wrote {n} real latents with their captions to {args.out}")


if __name__ == "__main__":
    main()
