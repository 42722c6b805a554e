"""Stage bootstrap: build the miniature world offline.

Renders the captioned splits, trains the teacher (text encoder, VAE, UNet) and saves it as a
diffusers ``StableDiffusionPipeline`` folder, and trains the world's CLIP scorer. Its report (the
teacher's attribute accuracy against chance, VAE PSNR, timings) is written as metrics.
"""

from __future__ import annotations

from pathlib import Path

from components.evaluation.scorer import train_scorer
from components.io import atomic_dir, write_json
from components.world.build import build_world
from components.world.export import read_split
from pipeline import paths
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, write_resolved

BOOTSTRAP_METRICS = paths.BOOTSTRAP_METRICS


def run(root: Path) -> None:
    configs = load_stage(root, "bootstrap")
    world, scorer = configs["world"], configs["scorer"]
    report = build_world(world, root / paths.WORLD, root / paths.TEACHER, log=log)
    images, captions = read_split(root / paths.WORLD / "train")
    with atomic_dir(root / paths.SCORER) as out:
        report["scorer"] = train_scorer(images, captions, scorer, out, log=log)
    write_resolved(root / paths.WORLD / "resolved_config.json", world=world, scorer=scorer)
    write_json(root / BOOTSTRAP_METRICS, report)
    log(f"bootstrap: world and teacher built in {report['total_seconds']} s")


def main() -> None:
    entry(run, "bootstrap")


if __name__ == "__main__":
    main()
