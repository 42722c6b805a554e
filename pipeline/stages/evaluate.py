"""Stage evaluate: the student at 1 step, the teacher at N steps with CFG (and over a list of
guidance scales: its FID-CLIP curve), and the untrained student (the teacher's own one-step
prediction), all under one protocol (``components.evaluation.protocols``): one image per caption
seeded with ``seed + i``, FID (KID, precision/recall) against the cached reference statistics,
CLIP score, attribute accuracy on the miniature world, latency at batch 1, a grid, eval cards.

Teacher results do not depend on the student: each is cached under a key of everything it
depends on (``.cache/eval``), so re-running evaluation after a new distillation costs only the
student's row.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from components import distributed
from components.evaluation.card import caption_list_hash, curve_points, result_cards
from components.evaluation.clip_score import load_scorer
from components.evaluation.grid import image_grid, save_png
from components.evaluation.inception import load_inception
from components.evaluation.latency import device_sync, measure_latency
from components.evaluation.plots import fid_bars, fid_clip_curve
from components.evaluation.protocols import captions_in_training, get_protocol, read_captions
from components.evaluation.run_cache import RunCache
from components.evaluation.samples import write_samples
from components.evaluation.sharding import broadcast, measure_sharded, processes
from components.evaluation.suite import Evaluator, Reference
from components.evaluation.uncertainty import HalfSampling
from components.generation import load_student, sample_teacher
from components.io import atomic_dir, read_json, sha256_tree, write_json
from components.prompts import read_text_prompts
from components.teacher import load_pipeline, resolve_model
from components.world.floors import FLOORS, renders_of
from components.world.render import attribute_accuracy
from components.world.train import reconstruct
from pipeline import paths
from pipeline.params import load_stage
from pipeline.stages.common import entry, log, require, write_resolved
from pipeline.stages.reference_stats import META_FILE, STATS_FILE

ORDER = ("student", "teacher", "teacher_1step")
GRID_ROWS = ("student", "teacher", "teacher, 1 step")
CHUNK = 1024  # images generated and scored at a time (rounded down to whole batches)


def _in_root(root: Path, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else root / path


def _captions(root: Path, cfg, protocol) -> list[str]:
    captions = read_captions(_in_root(root, cfg.captions), protocol.caption_format)
    captions = captions[: cfg.num_images]
    train = read_text_prompts(require(root / paths.TRAIN_PROMPTS, "prepare_prompts"))
    leaked = captions_in_training(captions, train)
    if leaked:
        raise ValueError(f"{len(leaked)} evaluation captions are also training prompts (e.g. "
                         f"{leaked[0]!r}); set `prompts.eval_source` to {cfg.captions} so "
                         "prepare_prompts removes them, and re-run `dvc repro`")
    return captions


def protocol_warnings(protocol, n_captions: int, n_reference: int) -> list[str]:
    """Why this run is not the full protocol (fewer captions, a smaller reference set): its
    numbers are a proxy, not comparable with published ones."""
    out = []
    if protocol.size and n_captions != protocol.size:
        out.append(f"protocol {protocol.name} scores {protocol.size} images, this run "
                   f"{n_captions} (`evaluate.num_images` or a short caption file)")
    if protocol.reference_size and n_reference != protocol.reference_size:
        out.append(f"protocol {protocol.name}'s reference set has {protocol.reference_size} "
                   f"images, `reference.images` {n_reference}")
    return [f"evaluate: warning: {w}: its FID is a proxy, not comparable with published "
            f"{protocol.name} numbers; register keeps it out of the promotion gate "
            "(`register.allow_incomplete`)" for w in out]


def _reference(root: Path) -> Reference:
    meta = read_json(require(root / paths.REFSTATS / META_FILE, "reference_stats"))
    stats = load_file(str(root / paths.REFSTATS / STATS_FILE))
    return Reference(stats["mu"], stats["sigma"], stats.get("features"), meta)


def _teacher_runs(root, teacher_cfg, cfg, captions, seeds, settings, score) -> dict:
    """Results (row, grid images, latency) of the teacher at each (steps, guidance) it runs; on
    rank 0 (the other processes of a job only generate their share of the images)."""
    runs = {"teacher": (cfg.teacher_steps, cfg.teacher_guidance_scale), "teacher_1step": (1, 1.0)}
    runs.update({f"curve_s{s:g}": (cfg.teacher_steps, s) for s in cfg.curve_guidance_scales
                 if s != cfg.teacher_guidance_scale})
    cache, pipe, out = RunCache(root / paths.TOOL_CACHE / "eval"), None, {}
    main = processes()[0] == 0
    for name, (steps, scale) in runs.items():
        timed = not name.startswith("curve")
        key = {**settings, "steps": steps, "guidance_scale": scale, "timed": timed}
        hit = cache.get(key) if main else None
        if broadcast(hit is None):
            pipe = pipe or load_pipeline(teacher_cfg, root, cfg.dtype()).to(cfg.device)
            row, images = score(name, lambda c, s, p=pipe, k=steps, g=scale: sample_teacher(
                p, c, s, k, g, cfg.batch_size))
            if not main:
                continue
            result = {"row": {**row, "steps": steps, "guidance_scale": scale}}
            if timed:
                result["latency"] = measure_latency(
                    lambda: sample_teacher(pipe, captions[:1], seeds[:1], steps, scale, 1),  # noqa: B023
                    cfg.latency_repeats, cfg.latency_warmup, device_sync(cfg.device))
                result["row"]["latency_s"] = result["latency"]["median_s"]
            hit = (result, images)
            cache.put(key, *hit)
        elif main:
            log(f"evaluate: {name} from cache")
        out[name] = hit
    return out


def _floor_runs(root, teacher_cfg, cfg, settings, score) -> dict:
    """The world's floors (``components.world.floors``): real renders of the evaluation captions
    and the teacher VAE's reconstructions of them, scored like a model and cached; rows on
    rank 0 (the other processes of a job only score their share)."""
    from diffusers import AutoencoderKL

    real = renders_of(root / paths.WORLD / "eval",
                      read_json(_in_root(root, cfg.captions))[: cfg.num_images])
    cache, out, main = RunCache(root / paths.TOOL_CACHE / "eval"), {}, processes()[0] == 0
    for name in FLOORS:
        key = {**settings, "floor": name}
        hit = cache.get(key) if main else None
        if broadcast(hit is None):
            images = real
            if name == "vae_reconstruction":
                source = resolve_model(teacher_cfg.model, root)
                vae = AutoencoderKL.from_pretrained(source, subfolder="vae").to(cfg.device)
                images = reconstruct(vae, torch.from_numpy(real).to(cfg.device)).cpu().numpy()
            # image i of the protocol is the render of caption i, whichever process scores it
            row, grid = score(name, lambda c, s, x=images: x[np.asarray(s) - cfg.seed])
            if not main:
                continue
            hit = ({**row, "steps": 0}, grid)
            cache.put(key, *hit)
        out[name] = hit[0]
    return out


def run(root: Path) -> None:
    configs = load_stage(root, "evaluate")
    teacher_cfg, cfg = configs["teacher"], configs["evaluate"]
    # under torchrun: images are split over the processes by index, results gathered to rank 0
    cfg = replace(cfg, device=distributed.init_from_env(cfg.device))
    protocol = get_protocol(cfg.protocol)
    captions = _captions(root, cfg, protocol)
    seeds = [cfg.seed + i for i in range(len(captions))]
    ref = _reference(root)
    ref.check_preprocess(protocol)
    for warning in protocol_warnings(protocol, len(captions), ref.meta["n_images"]):
        log(warning)
    net = load_inception(root / paths.TOOL_CACHE / "inception",
                         ref.meta["feature_network"]["source"], cfg.device)
    spec = cfg.scorer_spec()
    scorer = load_scorer(str(_in_root(root, spec)) if _in_root(root, spec).exists() else spec,
                         cfg.device)
    evaluator = Evaluator(protocol, ref, net, scorer, cfg.batch_size, cfg.kid,
                          cfg.precision_recall, cfg.seed, HalfSampling(seed=cfg.seed))
    world = protocol.name == "world"  # the world's 32-px images are all kept

    def score(name, generate):
        """Generate every image (this process's share) and score them; on rank 0 return the
        row and the grid images, elsewhere (None, None)."""
        got = measure_sharded(evaluator.measure, generate, captions, seeds, cfg.batch_size,
                              lambda i: world or i < cfg.grid_images, CHUNK)
        if got is None:
            return None, None
        row, images = evaluator.metrics(got["features"], got["sims"]), got["images"]
        if world:
            row["attribute_accuracy"] = attribute_accuracy(images, list(captions))
        log(f"evaluate: {name}: FID {row['fid']:.2f}, CLIP {row['clip_score']:.4f}")
        return row, images[: cfg.grid_images]

    pipe_src = Path(resolve_model(teacher_cfg.model, root))
    settings = {"teacher": sha256_tree(pipe_src) if pipe_src.is_dir() else teacher_cfg.model,
                "captions": caption_list_hash(captions), "seed": cfg.seed, "protocol": cfg.protocol,
                "scorer": scorer.weights, "ref": ref.meta["key"], "kid": cfg.kid,
                "precision_recall": cfg.precision_recall, "grid_images": cfg.grid_images,
                "latency": [cfg.latency_repeats, cfg.latency_warmup],
                "device": cfg.device.split(":")[0], "precision": cfg.precision,
                "uncertainty": evaluator.noise.describe()}
    results = _teacher_runs(root, teacher_cfg, cfg, captions, seeds, settings, score)
    floors = {}
    if world and protocol.caption_format == "prepared":
        floors = _floor_runs(root, teacher_cfg, cfg, settings, score)
    student = load_student(require(root / paths.STUDENT, "distill"), cfg.device, cfg.dtype())
    row, grid = score("student", lambda c, s: student.generate(c, s, cfg.batch_size))
    if processes()[0] == 0:
        latency = measure_latency(lambda: student.generate(captions[:1], seeds[:1], 1),
                                  cfg.latency_repeats, cfg.latency_warmup,
                                  device_sync(cfg.device))
        row = {**row, "latency_s": latency["median_s"], "steps": student.spec.steps}
        results["student"] = ({"row": row, "latency": latency}, grid)
        cards = _cards(cfg, protocol, results, captions, ref, net, scorer, evaluator.noise)
        _write(root, cfg, teacher_cfg, results, cards, captions, floors)
    distributed.finish()


def _cards(cfg, protocol, results, captions, ref, net, scorer, noise) -> dict:
    common = {
        "protocol": protocol.name, "caption_list_sha256": caption_list_hash(captions),
        "caption_file": Path(cfg.captions).name, "n_images": len(captions),
        "protocol_size": protocol.size, "complete": protocol.size in (None, len(captions)),
        "reference_sha256": ref.meta["images_sha256"], "reference_stats_key": ref.meta["key"],
        "n_reference": ref.meta["n_images"], "resize": ref.meta["resize"],
        "feature_network": net.name, "feature_weights_sha256": net.weights_sha256,
        "clip_model": cfg.scorer_spec(), "clip_weights": scorer.weights,
        "clip_prefix": protocol.clip_prefix, "base_seed": cfg.seed, "precision": cfg.precision,
        "device": cfg.device.split(":")[0], "processes": processes()[1],
        "uncertainty": noise.describe()}
    return result_cards(common, {name: result for name, (result, _) in results.items()})


def _write(root, cfg, teacher_cfg, results, cards, captions, floors) -> None:
    rows = {name: results[name][0]["row"] for name in ORDER}
    curve = curve_points([r["row"] for r, _ in results.values()], cfg.curve_guidance_scales)
    grids = np.concatenate([results[name][1] for name in ORDER])
    speedup = rows["teacher"]["latency_s"] / rows["student"]["latency_s"]
    latency = {"teacher_steps": cfg.teacher_steps, "teacher_ms": rows["teacher"]["latency_s"] * 1e3,
               "student_ms": rows["student"]["latency_s"] * 1e3, "speedup": speedup}
    with atomic_dir(root / paths.EVAL_OUT) as out:
        upscale = max(1, 96 // grids.shape[1])
        cols = len(results["student"][1])
        save_png(image_grid(grids, cols=cols, upscale=upscale, caption_lines=4,
                            column_captions=captions[:cols], row_labels=GRID_ROWS),
                 out / "grid.png")
        write_samples(out, captions[:cols], [cfg.seed + i for i in range(cols)],
                      {name: results[name][1] for name in ORDER})
        fid_bars({k: rows[k]["fid"] for k in ORDER}, out / "fid_bars.png")
        if curve:
            fid_clip_curve(curve, out / "fid_clip_curve.png", {"student": rows["student"]})
        doc = {name: {"card": cards[name], "metrics": rows[name]} for name in ORDER}
        if floors:  # scored under the students' card settings; nothing is sampled (steps 0)
            doc["floors"] = floors
        doc["teacher_curve"] = {"card": {**cards["teacher"], "guidance_scale": None},
                                "points": curve}
        doc["latency"] = latency
        write_json(out / "eval_card.json", doc)
        write_resolved(out / "resolved_config.json", teacher=teacher_cfg, evaluate=cfg)
    curve_metrics = {f"s{p['guidance_scale']:g}".replace(".", "_"): p for p in curve}
    write_json(root / paths.EVAL_METRICS, {"protocol": cfg.protocol, **rows, **floors,
                                           "teacher_curve": curve_metrics, "latency": latency})


def main() -> None:
    entry(run, "evaluate")


if __name__ == "__main__":
    main()
