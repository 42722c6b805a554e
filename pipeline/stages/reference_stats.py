"""Stage reference_stats: Inception statistics of the FID reference images, computed once.

The statistics are cached under the image set's content hash, the feature network and the
protocol's preprocessing (``.cache/refstats``), so the same reference images are never embedded
twice (Inception runs on ``reference.device``, in fp32); the stage output holds the statistics
in use (mu, sigma and a seeded subset of the features for KID and precision/recall).
``evaluate`` only reads them, never recomputes them.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.numpy import save_file

from components.evaluation.fid import feature_subset, load_statistics, reference_statistics
from components.evaluation.inception import load_inception
from components.evaluation.protocols import get_protocol
from components.io import atomic_dir, write_json
from pipeline import paths
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, write_resolved

STATS_FILE = "stats.safetensors"
META_FILE = "meta.json"


def run(root: Path) -> None:
    cfg = load_stage(root, "reference_stats")["reference"]
    images = Path(cfg.images) if Path(cfg.images).is_absolute() else root / cfg.images
    if not images.is_dir():
        raise FileNotFoundError(f"reference image folder {images} not found; set "
                                "`reference.images` to a folder of images (e.g. COCO val2014)")
    net = load_inception(root / paths.TOOL_CACHE / "inception", cfg.feature_weights, cfg.device)
    cache = root / paths.TOOL_CACHE / "refstats"
    preprocess = get_protocol(cfg.protocol).preprocess
    _, _, meta = reference_statistics(images, cache, net, cfg.batch_size, preprocess)
    stats = load_statistics(cache / f"{meta['key']}.safetensors")
    kept = feature_subset(stats.pop("features"), cfg.keep_features, seed=0)
    if cfg.keep_features:
        stats["features"] = kept
    meta = {**meta, "source": f"folder {cfg.images}",  # as configured, not this machine's path
            "protocol": cfg.protocol, "n_features_kept": len(kept) if cfg.keep_features else 0}
    with atomic_dir(root / paths.REFSTATS) as out:
        save_file(stats, str(out / STATS_FILE))
        write_json(out / META_FILE, meta)
        write_resolved(out / "resolved_config.json", reference=cfg)
    log(f"reference_stats: {meta['n_images']} reference images, key {meta['key']}")


def main() -> None:
    entry(run, "reference_stats")


if __name__ == "__main__":
    main()
