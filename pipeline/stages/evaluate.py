"""Stage evaluate: the student at 1 step, the teacher at N steps with CFG, and the untrained
student (the teacher's own one-step prediction), all under one protocol: one image per
evaluation caption seeded with ``seed + i``, FID against the cached reference statistics, CLIP
score, attribute accuracy on the miniature world, latency at batch 1, a grid and an eval card.

The teacher's two rows do not depend on the student: they are cached under a key of everything
they depend on (``.cache/eval``), so re-running evaluation after a new distillation costs only
the student's row.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from components.evaluation.card import caption_list_hash, eval_card
from components.evaluation.clip_score import clip_score, load_scorer
from components.evaluation.fid import fid_against_statistics, inception_features
from components.evaluation.grid import image_grid, save_png
from components.evaluation.inception import load_inception
from components.evaluation.latency import measure_latency
from components.evaluation.plots import fid_bars
from components.generation import load_student, sample_teacher
from components.io import atomic_dir, read_json, sha256_bytes, sha256_tree, write_json
from components.teacher import load_pipeline
from components.world.render import attribute_accuracy
from pipeline import paths
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, require, write_resolved
from pipeline.stages.reference_stats import META_FILE, STATS_FILE


def _score(name, images, captions, ref, net, scorer, cfg, latency) -> dict:
    """FID, CLIP score (and attribute accuracy on the world) of one model's images."""
    features = inception_features(images, net, cfg.batch_size)
    row = {"fid": fid_against_statistics(ref["mu"], ref["sigma"], features),
           "clip_score": clip_score(images, captions, scorer, cfg.clip_prefix, cfg.batch_size),
           "latency_s": latency["median_s"]}
    if cfg.protocol == "world":
        row["attribute_accuracy"] = attribute_accuracy(images, list(captions))
    log(f"evaluate: {name}: FID {row['fid']:.2f}, CLIP {row['clip_score']:.4f}, "
        f"latency {row['latency_s'] * 1000:.1f} ms")
    return row


def _teacher_rows(root, teacher_cfg, cfg, captions, seeds, ref_meta, score) -> tuple[dict, dict]:
    """Rows (and grid images) of the teacher and the untrained student, cached by key."""
    pipe = load_pipeline(teacher_cfg, root).to(cfg.device)
    src = Path(pipe.name_or_path)
    key_src = {"teacher": sha256_tree(src) if src.is_dir() else teacher_cfg.model,
               "captions": sha256_bytes("\n".join(captions).encode()), "seeds": seeds[0],
               "n": len(seeds), "cfg": {k: getattr(cfg, k) for k in (
                   "protocol", "teacher_steps", "teacher_guidance_scale", "scorer",
                   "clip_prefix", "grid_images", "latency_repeats")}, "ref": ref_meta["key"]}
    key = sha256_bytes(json.dumps(key_src, sort_keys=True).encode())[:20]
    cache = root / paths.TOOL_CACHE / "eval"
    if (cache / f"{key}.json").exists():
        log("evaluate: teacher rows from cache")
        return read_json(cache / f"{key}.json"), load_file(str(cache / f"{key}.safetensors"))
    runs = {"teacher": (cfg.teacher_steps, cfg.teacher_guidance_scale), "teacher_1step": (1, 1.0)}
    rows, grids = {}, {}
    for name, (steps, scale) in runs.items():
        images = sample_teacher(pipe, captions, seeds, steps, scale, cfg.batch_size)
        one = functools.partial(sample_teacher, pipe, captions[:1], seeds[:1], steps, scale, 1)
        latency = measure_latency(one, cfg.latency_repeats)
        rows[name] = {**score(name, images, latency), "steps": steps, "guidance_scale": scale}
        grids[name] = np.ascontiguousarray(images[: cfg.grid_images])
    cache.mkdir(parents=True, exist_ok=True)
    save_file(grids, str(cache / f"{key}.safetensors"))
    write_json(cache / f"{key}.json", rows)
    return rows, grids


def run(root: Path) -> None:
    configs = load_stage(root, "evaluate")
    teacher_cfg, cfg = configs["teacher"], configs["evaluate"]
    rows_in = read_json(require(root / paths.EVAL_CAPTIONS, "prepare_prompts"))[: cfg.num_images]
    captions = [r["caption"] for r in rows_in]
    seeds = [cfg.seed + i for i in range(len(captions))]
    ref_meta = read_json(require(root / paths.REFSTATS / META_FILE, "reference_stats"))
    ref = load_file(str(root / paths.REFSTATS / STATS_FILE))
    net = load_inception(root / paths.TOOL_CACHE / "inception",
                         ref_meta["feature_network"]["source"], cfg.device)
    scorer = load_scorer(str(root / cfg.scorer) if (root / cfg.scorer).exists() else cfg.scorer,
                         cfg.device)

    def score(name, images, latency):
        return _score(name, images, captions, ref, net, scorer, cfg, latency)

    rows, grids = _teacher_rows(root, teacher_cfg, cfg, captions, seeds, ref_meta, score)
    student = load_student(require(root / paths.STUDENT, "distill"), cfg.device)
    images = student.generate(captions, seeds, cfg.batch_size)
    latency = measure_latency(lambda: student.generate(captions[:1], seeds[:1], 1),
                              cfg.latency_repeats)
    rows = {"student": {**score("student", images, latency), "steps": student.spec.steps}, **rows}
    grids["student"] = images[: cfg.grid_images]
    _write(root, cfg, teacher_cfg, rows, grids, captions, ref_meta, net, scorer)


def _cards(cfg, rows, captions, ref_meta, net, scorer) -> dict:
    """One eval card per row: the settings that make its numbers comparable, or not."""
    guidance = {"student": None, "teacher": cfg.teacher_guidance_scale, "teacher_1step": None}
    return {name: eval_card(
        protocol=cfg.protocol, caption_list_sha256=caption_list_hash(captions),
        n_images=len(captions), reference_sha256=ref_meta["images_sha256"],
        reference_stats_key=ref_meta["key"], resize=ref_meta["resize"],
        feature_network=net.name, feature_weights_sha256=net.weights_sha256,
        clip_model=cfg.scorer, clip_weights=scorer.weights, clip_prefix=cfg.clip_prefix,
        base_seed=cfg.seed, precision="fp32", guidance_scale=guidance[name],
        steps=rows[name]["steps"], device=cfg.device) for name in rows}


def _write(root, cfg, teacher_cfg, rows, grids, captions, ref_meta, net, scorer) -> None:
    order = ["student", "teacher", "teacher_1step"]
    cards = _cards(cfg, rows, captions, ref_meta, net, scorer)
    with atomic_dir(root / paths.EVAL_OUT) as out:
        grid = np.concatenate([grids[name] for name in order])
        save_png(image_grid(grid, cols=len(grids["student"]), upscale=3), out / "grid.png")
        fid_bars({k: rows[k]["fid"] for k in order}, out / "fid_bars.png")
        write_json(out / "eval_card.json", {name: {"card": cards[name], "metrics": rows[name]}
                                            for name in order})
        write_resolved(out / "resolved_config.json", teacher=teacher_cfg, evaluate=cfg)
    write_json(root / paths.EVAL_METRICS, {"protocol": cfg.protocol, **rows})


def main() -> None:
    entry(run, "evaluate")


if __name__ == "__main__":
    main()
