"""Throughput of the evaluation's three costs: generation, Inception features, CLIP score.

    uv run python bench/eval_throughput.py --device cpu --n 8 --out bench/results/cpu.json
    uv run python bench/eval_throughput.py --device cuda --n 512 --out bench/results/h100.json

Prints a markdown table (images/s, seconds per image) and writes the same rows as JSON, with the
machine, library versions and settings. Rows:

- generation: the teacher at ``--teacher-steps`` with CFG and a one-step student (the teacher's
  UNet at t = 999: the cost of a one-step student), per image, batched. ``--teacher`` is a
  diffusers folder (default: the miniature world's ``models/teacher``), ``world-random`` (the
  world teacher's architecture from ``params.yaml``, random weights) or ``sd15-random``: the
  Stable Diffusion 1.5 architecture with random weights built in code (same compute as the real
  model, nothing downloaded).
- Inception: pool3 features under the world protocol (32 px, torch-fidelity resize) and the COCO
  protocols (512 px images: centre crop + LANCZOS 256, clean-fid resize to 299), preprocessing
  included; the COCO preprocessing alone is a row too.
- CLIP: ``--clip`` (default ``ViT-g-14``: the COCO protocols' architecture with random weights, the
  same compute as ``laion2b_s12b_b42k``) on 256-px images, fp32.

The last row estimates COCO-30K end to end (one-step student, Inception, CLIP) from the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from components.evaluation.card import library_versions
from components.evaluation.clip_score import clip_similarities, load_scorer
from components.evaluation.fid import inception_features
from components.evaluation.inception import load_inception
from components.evaluation.protocols import PROTOCOLS
from components.evaluation.resize import Preprocess, clean_resize_batch
from components.generation import GeneratorSpec, Student, sample_teacher

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, n_images: int, warmup: bool = True) -> dict:
    """Run ``fn`` once to warm up (unless told not to), then time one call of ``n_images``."""
    if warmup:
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    seconds = time.perf_counter() - start
    return {"images": n_images, "seconds": seconds, "images_per_s": n_images / seconds}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sd15_random(device: str, dtype: torch.dtype):
    """Stable Diffusion 1.5's architecture (UNet, VAE, CLIP text encoder) with random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from components.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        layers_per_block=2, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def world_random(device: str):
    """The miniature world's teacher architecture from ``params.yaml`` with random weights."""
    import tempfile

    from diffusers import DiffusionPipeline

    from components.world.models import (
        build_text_encoder,
        build_unet,
        build_vae,
        save_pipeline,
    )
    from components.world.tokenizer import build_tokenizer
    from pipeline.params import load_all

    world = load_all(ROOT)["world"]
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    latent = world.data.image_size // 2 ** (len(world.vae.channels) - 1)
    with tempfile.TemporaryDirectory() as folder:
        save_pipeline(folder, build_vae(world.vae, world.data.image_size),
                      build_text_encoder(world.text, len(tokenizer)), tokenizer,
                      build_unet(world.unet, latent, world.vae.latent_channels, world.text.hidden))
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_teacher(spec: str, device: str):
    if spec == "sd15-random":
        return sd15_random(device, torch.float32)
    if spec == "world-random":
        return world_random(device)
    from components.teacher import TeacherConfig, load_pipeline

    return load_pipeline(TeacherConfig(spec), ROOT).to(device)


def generation_rows(args) -> dict:
    pipe = load_teacher(args.teacher, args.device)
    n, prompts = args.n_gen, ["a photo of a cat sitting on a red chair"] * args.n_gen
    seeds = list(range(n))
    student = Student(pipe, GeneratorSpec())
    teacher = timed(lambda: sample_teacher(pipe, prompts, seeds, args.teacher_steps,
                                           args.guidance_scale, args.batch_size), n)
    one = timed(lambda: student.generate(prompts, seeds, args.batch_size), n)
    size = pipe.vae.config.sample_size
    return {f"generation: teacher, {args.teacher_steps} steps + CFG ({size} px)": teacher,
            f"generation: one-step student ({size} px)": one}


def inception_rows(args) -> dict:
    net = load_inception(ROOT / ".cache" / "inception", "fid-helper", args.device)
    rng = np.random.default_rng(0)
    world = rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    coco = rng.integers(0, 256, (args.n, 512, 512, 3), dtype=np.uint8)
    coco_pre = PROTOCOLS["coco2014_30k"].preprocess
    bs = args.batch_size
    return {
        "Inception: world protocol (32 px in)": timed(
            lambda: inception_features(world, net, bs, Preprocess()), args.n),
        "preprocess only: crop + LANCZOS 256 + clean resize 299 (512 px in)": timed(
            lambda: clean_resize_batch(coco_pre.crop(coco)), args.n),
        "Inception: COCO protocols (512 px in, preprocessing included)": timed(
            lambda: inception_features(coco, net, bs, coco_pre), args.n),
    }


def clip_rows(args) -> dict:
    images = np.random.default_rng(1).integers(0, 256, (args.n_clip, 256, 256, 3), dtype=np.uint8)
    captions = ["a photo of a cat sitting on a red chair"] * args.n_clip
    if ":" in args.clip or Path(args.clip).is_dir():
        scorer = load_scorer(args.clip, args.device)
        label = args.clip
    else:  # the architecture only, random weights: the same compute as the pretrained model
        import open_clip

        from components.evaluation.clip_score import Scorer

        model, _, preprocess = open_clip.create_model_and_transforms(
            args.clip, pretrained=None, device=args.device, precision="fp32")
        model.eval().requires_grad_(False)
        scorer = Scorer(model, preprocess, open_clip.get_tokenizer(args.clip), args.clip,
                        args.clip, "random")
        label = f"{args.clip} (random weights)"
    run = lambda: clip_similarities(images, captions, scorer, "A photo depicts ",
                                    args.batch_size)
    return {f"CLIP score: {label}, fp32, 256 px in": timed(run, args.n_clip)}


def estimate_coco30k(rows: dict) -> dict | None:
    gen = next((r for k, r in rows.items() if k.startswith("generation: one-step")), None)
    inc = next((r for k, r in rows.items() if k.startswith("Inception: COCO")), None)
    clip = next((r for k, r in rows.items() if k.startswith("CLIP")), None)
    if not (gen and inc and clip):
        return None
    seconds = sum(30000 / r["images_per_s"] for r in (gen, inc, clip))
    return {"images": 30000, "seconds": seconds, "images_per_s": 30000 / seconds}


def table(rows: dict) -> str:
    lines = ["| what | images | seconds | images/s | ms per image |", "| --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | "
                     f"{1000 / r['images_per_s']:.1f} |")
    return "\n".join(lines)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, {platform.machine()}"
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU, {threads} torch threads, no GPU used"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=16, help="images for the Inception rows")
    parser.add_argument("--n-gen", type=int, default=8, help="images for the generation rows")
    parser.add_argument("--n-clip", type=int, default=4, help="images for the CLIP row")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher", default="models/teacher",
                        help="a diffusers folder, world-random or sd15-random")
    parser.add_argument("--teacher-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--clip", default="ViT-g-14",
                        help="open_clip architecture (random weights), or a scorer spec/folder")
    parser.add_argument("--skip", nargs="*", default=[], choices=["generation", "inception", "clip"])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()

    rows: dict = {}
    for name, fn in (("generation", generation_rows), ("inception", inception_rows),
                     ("clip", clip_rows)):
        if name not in args.skip:
            rows.update(fn(args))
            print(f"done: {name}", file=sys.stderr, flush=True)
    estimate = estimate_coco30k(rows)
    if estimate:
        rows["estimate: COCO-30K end to end (one-step student + Inception + CLIP)"] = estimate
    print(f"machine: {machine(args.device)}\n")
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        doc = {"machine": machine(args.device), "load_average_1_5_15_min_at_end": load,
               "settings": vars(args) | {"out": str(args.out)},
               "versions": library_versions(), "rows": rows}
        args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
