"""Stage distill: train the one-step student with the configured method.

Checkpoints live in ``checkpoints/distill/<run key>/`` (``pipeline.checkpoints``): a killed run
resumes from its last checkpoint when re-run, and so does a run with only a longer ``loop.steps``
or other cadences; other params, inputs or code start another run. The folders of the last
``distill.keep_runs`` runs are kept. Sample grids, loss and proxy-FID rows and the wall time are
kept in the run's folder across its segments.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from tqdm import tqdm

from components import distributed
from components.batches import PairBatches, PromptBatches
from components.config import to_dict
from components.embed_cache import CacheError, EmbeddingCache, PromptEncoder, text_mode
from components.evaluation.fid import fid_against_statistics, inception_features
from components.evaluation.grid import image_grid, save_png
from components.evaluation.inception import load_inception
from components.evaluation.resize import Preprocess
from components.generation import (
    SeededNoise,
    decode_latents,
    encode_prompts,
    generate_latents,
    latent_shape,
    latents_to_vae,
    precision_dtype,
    save_student,
)
from components.io import atomic_dir, read_json, sha256_file, sha256_tree, write_json
from components.methods import Teacher, get_method, pair_guidance_range
from components.monitor import Monitor, TrainingAlarm, image_statistics
from components.networks import saved_network
from components.pair_cache import PairCache
from components.policy import TrainingPolicy
from components.student import save_lora_student
from components.teacher import load_pipeline, resolve_model, teacher_denoiser
from components.training import checkpoint_step, train
from pipeline import paths
from pipeline.checkpoints import (
    ROWS_FILE,
    BestStudent,
    RunRecord,
    best_row,
    code_hash,
    prune_runs,
    run_key,
)
from pipeline.launch import torchrun
from pipeline.params import load_stage
from pipeline.plan import preflight, prompt_count, text_request
from pipeline.recipes import recipe_warning, teacher_unet_config
from pipeline.stages.common import entry, log, require, write_resolved


def _images(pipe, student, cache: EmbeddingCache | PromptEncoder, spec, n: int, seed: int, device: str,
            prompts: int | None = None):
    """Student images of the first ``prompts`` (default: all) cached prompts, cycled, n in all;
    image i seeded with seed + i."""
    cond = cache.conditioning(torch.arange(n) % min(prompts or len(cache), len(cache)))
    cond = cond.to(device)
    out = []
    with torch.no_grad():
        for k in range(0, n, 64):
            noise = SeededNoise(range(seed + k, seed + min(n, k + 64)))
            z = noise(latent_shape(pipe)).to(device)
            latents = generate_latents(student, z, cond.rows(slice(k, k + 64)), spec, noise.like)
            out.append(decode_latents(pipe, latents))
    return np.concatenate(out)


def _proxy_fid(root: Path, cfg):
    """FID of ``cfg.proxy_fid_images`` student images on training prompts against the cached
    reference statistics: a cheap in-training signal (not the evaluate stage's protocol)."""
    if cfg.proxy_fid_images <= 0:
        return None
    meta = read_json(require(root / paths.REFSTATS / "meta.json", "reference_stats"))
    ref = load_file(str(root / paths.REFSTATS / "stats.safetensors"))
    net = load_inception(root / paths.TOOL_CACHE / "inception",
                         meta["feature_network"]["source"], cfg.device)
    prep = Preprocess(**meta["preprocess"])  # the reference set's own preprocessing
    return lambda images: fid_against_statistics(ref["mu"], ref["sigma"],
                                                 inception_features(images, net, 64, prep))


STOPPED_FILE = "stopped.json"  # in the run's folder: the step and reason the monitor stopped at


def _sampler(root: Path, pipe, cache: EmbeddingCache | PromptEncoder, spec, cfg, record: RunRecord):
    """A callback writing a grid of the student's images at fixed prompts and seeds into the
    run's folder, and the proxy FID when enabled (the weights of its lowest value so far kept,
    ``BestStudent``); it returns the monitor's image statistics (``components.monitor``) and
    the proxy FID, also kept in the run's sample rows."""
    fid = _proxy_fid(root, cfg)
    best = BestStudent(record.folder)

    def on_sample(student: torch.nn.Module, step: int) -> dict:
        student.eval()
        n = min(cfg.sample_prompts, len(cache))
        images = _images(pipe, student, cache, spec, n, cfg.sample_seed, cfg.device)
        save_png(image_grid(images, cols=min(n, 8), upscale=4),
                 record.samples / f"step-{step:07d}.png")
        row = {}
        if cfg.monitor.action != "off":
            prompts = min(cfg.monitor.prompts, len(cache))
            images = _images(pipe, student, cache, spec, prompts * cfg.monitor.seeds,
                             cfg.sample_seed, cfg.device, prompts)
            row.update({k: round(v, 6) for k, v in image_statistics(images, prompts).items()})
        if fid is not None:
            images = _images(pipe, student, cache, spec, cfg.proxy_fid_images, cfg.sample_seed,
                             cfg.device)
            row["proxy_fid"] = round(fid(images), 4)
            best.offer(student, row["proxy_fid"], step, record.rows)
        if row:
            record.add({"step": step, **row})
        student.train()
        return row
    return on_sample


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _prompt_encoder(root: Path, pipe, precision: str, prompts_sha: str) -> PromptEncoder:
    """``cache.text_embeddings: on_the_fly``: the teacher's text encoders, frozen on the distill
    device in ``cache.precision``, encode each batch's training prompts."""
    dtype = precision_dtype(precision)
    for name in TEXT_ENCODERS:
        if (encoder := getattr(pipe, name, None)) is not None:
            encoder.to(dtype).eval().requires_grad_(False)
    prompts = require(root / paths.TRAIN_PROMPTS, "prepare_prompts").read_text(
        encoding="utf-8").splitlines()
    log(f"distill: encoding the {len(prompts)} training prompts on the fly with the teacher's "
        f"text encoders ({precision}; cache.text_embeddings: on_the_fly)")
    return PromptEncoder(root / paths.CACHE, prompts, lambda batch: encode_prompts(pipe, batch),
                         prompts_sha)


def _decoder(pipe):
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return pipe.vae.decode(latents_to_vae(latents, pipe.vae), return_dict=False)[0].float()
    return decode


def _batches(root: Path, cache: EmbeddingCache | PromptEncoder, pipe, method, cfg, prompts_sha: str):
    """Prompt batches, or teacher-pair batches for methods that train on the teacher's ODE."""
    if not method.needs_pairs:
        return PromptBatches.from_cache(cache, latent_shape(pipe), cfg.device)
    pairs = PairCache(root / paths.PAIRS, expected_prompts_sha256=prompts_sha)
    pairs.verify()
    if len(pairs) == 0:
        raise CacheError(f"method {cfg.method!r} trains on teacher ODE pairs but the pair cache "
                         "is empty: set `cache.pairs.count` > 0 in params.yaml and run "
                         "`dvc repro cache_teacher`")
    _check_pair_guidance(pairs.index.get("guidance_range"), cfg)
    return PairBatches(cache, cache.null(1), pairs, latent_shape(pipe), cfg.device)


def _check_pair_guidance(have, cfg) -> None:
    """A method that trains each pair at its own guidance needs pairs sampled over its range."""
    want = pair_guidance_range(cfg.method, cfg.method_config())
    if want is None or (have is not None and tuple(have) == tuple(want)):
        return
    fix = (f"set `cache.pairs.guidance_range: [{want[0]}, {want[1]}]` in params.yaml and run "
           "`dvc repro cache_teacher`")
    if have is None:
        log(f"distill: warning: the teacher pairs were sampled at one CFG scale, so {cfg.method} "
            f"draws w uniformly and learns the w-dependence right only near that scale; {fix}")
        return
    raise CacheError(f"method {cfg.method!r} trains at CFG scales {list(want)} but the teacher "
                     f"pairs were sampled over {list(have)}: {fix}")


def _loss_logger(record: RunRecord):
    def log_metrics(metrics: dict, step: int) -> None:
        record.add({"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}})
    return log_metrics


def _write_losses(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r} - {"step"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *keys])
        writer.writeheader()
        writer.writerows(rows)


def _resolved(root: Path, teacher_cfg, cfg, method_cfg, cache, method) -> dict:
    """The configs and the hashes of everything else the student depends on (``run_key``)."""
    teacher_dir = Path(resolve_model(teacher_cfg.model, root))
    resolved = {"teacher": to_dict(teacher_cfg), "distill": to_dict(cfg),
                "method_config": to_dict(method_cfg),
                "teacher_sha256": sha256_tree(teacher_dir) if teacher_dir.is_dir() else None,
                "cache": sha256_file(cache.folder / "index.json"), "code": code_hash()}
    if method.needs_pairs:
        resolved["pairs"] = sha256_file(root / paths.PAIRS / "index.json")
    return resolved


def _run_folder(root: Path, key: str, steps: int) -> Path:
    """The run's checkpoint folder: ``<key>``, or ``<key>-steps<N>`` when ``<key>`` is trained
    beyond ``steps`` (a shorter run of the same training: its state at ``steps`` is gone)."""
    folder = root / paths.CHECKPOINTS / key
    done = checkpoint_step(folder)
    if done <= steps:
        return folder
    log(f"distill: run {key} is trained to step {done}, beyond distill.loop.steps {steps}: "
        f"training {steps} steps in {key}-steps{steps}")
    return folder.with_name(f"{key}-steps{steps}")


def _resume(ckpt_dir: Path, steps: int, record: RunRecord) -> None:
    """Say where the run resumes and drop what a killed segment logged after that step."""
    done = checkpoint_step(ckpt_dir)
    if done:
        log(f"distill: resuming from step {done} of {steps}"
            + (": already trained" if done == steps else ""))
    record.resume_from(done)


def _progress(root: Path, cfg, record: RunRecord, run: str, is_main: bool):
    """The loop's progress callback: the bar, the wall clock, and once this run holds a
    checkpoint, retention of the other runs' folders (rank 0 only)."""
    bar = tqdm(total=cfg.loop.steps, desc=f"distill ({cfg.method})", unit="step",
               disable=not is_main)
    pruned = []

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()
        record.tick()
        checkpointed = done % cfg.loop.checkpoint_every == 0 or done == total
        if checkpointed and is_main and not pruned:
            pruned.append(prune_runs(root / paths.CHECKPOINTS, cfg.keep_runs, run))
            if pruned[0]:
                log(f"distill: removed the checkpoints of older runs {', '.join(pruned[0])} "
                    f"(distill.keep_runs: {cfg.keep_runs})")
    return progress, bar


def run(root: Path) -> None:
    configs = load_stage(root, "distill")
    teacher_cfg, cfg = configs["teacher"], configs["distill"]
    distributed.check_processes(cfg.processes, cfg.device)
    if cfg.processes > 1 and not distributed.launched():
        torchrun("pipeline.stages.distill", root, cfg.processes)  # this stage, N processes
        return
    # under torchrun: join the job; "cuda" becomes this process's GPU
    local = replace(cfg, device=distributed.init_from_env(cfg.device))
    is_main = distributed.context().is_main
    policy = TrainingPolicy(cfg.policy)
    if is_main and (warning := recipe_warning(teacher_unet_config(teacher_cfg, root), cfg,
                                              teacher_cfg.model)):
        log(warning)  # a real teacher with another preset's settings
    index = root / paths.CACHE / "index.json"

    def text(spec):  # the plan counts the text encoders when they encode on the fly
        if not index.is_file():
            return None  # no cache yet: the cache's own check below says so
        cache_index = read_json(index)
        return text_request(teacher_cfg, root, spec, None,
                            cache_index.get("text_embeddings", "disk"), cache_index["dtype"],
                            configs["cache.precision"], prompt_count(root))

    plan = preflight(root, teacher_cfg, cfg, local.device, text)  # too little memory stops here
    method_cfg = cfg.method_config()
    torch.manual_seed(cfg.loop.seed)
    prompts_sha = read_json(require(root / paths.PROMPTS_MANIFEST, "prepare_prompts"))[
        "train_sha256"]
    # how the cache holds the prompts: in shards, or to be encoded on the fly
    on_the_fly = text_mode(root / paths.CACHE) == "on_the_fly"
    if not on_the_fly:
        cache = EmbeddingCache(root / paths.CACHE, expected_prompts_sha256=prompts_sha)
        cache.verify()  # a corrupt shard stops the run here, before any weight is loaded
    # the text encoders load only to encode the prompts on the fly
    skip = {} if on_the_fly else {"text_encoder": None, "tokenizer": None}
    pipe = load_pipeline(teacher_cfg, root, **skip).to(local.device)
    if on_the_fly:
        cache = _prompt_encoder(root, pipe, configs["cache.precision"], prompts_sha)
    _, build = get_method(cfg.method)
    method = build(method_cfg, Teacher(teacher_denoiser(pipe), _decoder(pipe), cfg.student),
                   cfg.loop.steps)
    batches = _batches(root, cache, pipe, method, local, prompts_sha)
    resolved = _resolved(root, teacher_cfg, cfg, method_cfg, cache, method)
    ckpt_dir = _run_folder(root, run_key(resolved, cfg.method), cfg.loop.steps)
    record = RunRecord(ckpt_dir)
    (ckpt_dir / STOPPED_FILE).unlink(missing_ok=True)  # an earlier segment's stop, if any
    _resume(ckpt_dir, cfg.loop.steps, record)
    progress, bar = _progress(root, cfg, record, ckpt_dir.name, is_main)
    monitor = Monitor(cfg.monitor, lambda message: log(f"distill: {message}"))
    monitor.replay(record.rows)  # a resumed run goes on checking from where it was
    try:
        ema = train(method, batches, cfg.loop, ckpt_dir, _loss_logger(record),
                    _sampler(root, pipe, cache, method.spec, local, record), progress, policy,
                    monitor)
    except TrainingAlarm as alarm:
        if is_main:
            _log_stopped_run(root, cfg, teacher_cfg, record, alarm,
                             configs["register.experiment"])
        raise
    finally:
        bar.close()
    ema.copy_to(method.student())
    student = policy.full_module(method.student())  # every process gathers; rank 0 keeps it
    if is_main:
        chosen = _chosen(student, cfg, record)
        _save(root, teacher_cfg, method.spec, student, policy, cfg, record, resolved, plan,
              chosen, monitor)
    distributed.finish()


def _chosen(student, cfg, record: RunRecord) -> dict:
    """Which weights become the student: the last step's (EMA), or with ``distill.save: best``
    those of the run's lowest proxy FID (loaded into ``student``)."""
    rows = [r for r in record.rows if r["step"] <= cfg.loop.steps]
    if cfg.save == "best":
        best = BestStudent(record.folder).load_into(student, rows)
        log(f"distill: saving the weights of step {best['step']} (lowest proxy FID "
            f"{best['proxy_fid']:.2f}; distill.save: best)")
        return {"which": "best", "step": best["step"], "proxy_fid": best["proxy_fid"]}
    best = best_row(rows)
    return {"which": "last", "step": cfg.loop.steps,
            **({"best_step": best["step"], "best_proxy_fid": best["proxy_fid"]} if best else {})}


def _log_stopped_run(root: Path, cfg, teacher_cfg, record: RunRecord, alarm: TrainingAlarm,
                     experiment: str) -> None:
    """The monitor stopped the run: record it in the run's folder and as a failed MLflow run
    (register's experiment) with the reason, the step, the params and the grids so far."""
    from components.registry.store import artifact_location, log_stopped_run, tracking_uri
    from pipeline.params import read_params

    stopped = {"step": alarm.step, "reason": alarm.reason, "method": cfg.method,
               "teacher": teacher_cfg.model}
    write_json(record.folder / STOPPED_FILE, stopped)
    uri = tracking_uri(root)
    try:
        run_id = log_stopped_run(uri, experiment, artifact_location(root, uri), stopped,
                                 read_params(root), [record.samples, record.folder / ROWS_FILE])
    except OSError as err:  # the alarm itself must reach the user, not this
        log(f"distill: warning: the stopped run could not be logged to MLflow at {uri}: {err}")
        return
    log(f"distill: the stopped run is MLflow run {run_id} (experiment {experiment!r}, status "
        "FAILED)")


def _save(root, teacher_cfg, spec, student, policy, cfg, record: RunRecord, resolved,
          plan: dict | None = None, chosen: dict | None = None,
          monitor: Monitor | None = None) -> None:
    extra = {"method": cfg.method, "teacher": teacher_cfg.model, "steps": cfg.loop.steps,
             "policy": policy.describe(), "student": cfg.student.describe(),
             **({"saved": chosen} if chosen else {})}
    with atomic_dir(root / paths.STUDENT) as out:
        if cfg.student.kind == "lora":  # the LoRA, and the full-weight folder of it fused
            save_lora_student(load_pipeline(teacher_cfg, root), _plain(student).to("cpu"),
                              cfg.student, spec, out, extra)
        else:  # the UNet or flow transformer (a flow student's w input folded in)
            name, network, saved = saved_network(student, spec)
            if saved != spec:
                extra["w_embedding"] = f"folded in at guidance_weight {spec.guidance_weight:g}"
            full = load_pipeline(teacher_cfg, root, **{name: _plain(network).to("cpu")})
            save_student(full, saved, out, extra)
    with atomic_dir(root / paths.DISTILL_OUT) as out:
        (out / "samples").mkdir()
        if plan is not None:  # the run's memory and time plan (MLflow gets it with the run)
            write_json(out / "plan.json", plan)
        if monitor is not None and monitor.enabled:  # its flags, for register and the card
            write_json(out / paths.MONITOR_FILE,
                       {"action": cfg.monitor.action, "flags": monitor.records()})
        for grid in sorted(record.samples.glob("step-*.png")):  # a longer killed run's: not ours
            if int(grid.stem.split("-")[1]) <= cfg.loop.steps:
                shutil.copy2(grid, out / "samples" / grid.name)
        write_resolved(out / "resolved_config.json", **{
            k: v for k, v in resolved.items() if k in ("teacher", "distill", "method_config")})
    rows = [r for r in record.rows if r["step"] <= cfg.loop.steps]
    sampled = [r for r in rows if "proxy_fid" in r or "monitor_diversity" in r]
    losses = [r for r in rows if r not in sampled]
    fids = [r for r in sampled if "proxy_fid" in r]
    _write_losses(root / paths.LOSS_PLOT, losses)
    _write_losses(root / paths.PROXY_FID_PLOT, fids)
    last = {**(losses[-1] if losses else {}), **(fids[-1] if fids else {})}
    images_seen = cfg.loop.steps * cfg.loop.batch_size
    wall = record.wall_seconds()
    flags = {"monitor_flags": len(monitor.flags)} if monitor is not None and monitor.enabled \
        else {}
    which = {f"saved_{k}" if k in ("step", "proxy_fid") else k: v
             for k, v in (chosen or {}).items() if k != "which"}
    write_json(root / paths.DISTILL_METRICS, {"steps": cfg.loop.steps, "images_seen": images_seen,
                                              "wall_seconds": round(wall, 1),
                                              **{k: v for k, v in last.items() if k != "step"},
                                              **flags, **which})
    log(f"distill: {cfg.loop.steps} steps ({images_seen} images) in {wall:.0f} s (every "
        f"segment of the run); student saved to {paths.STUDENT}")


def _plain(student: torch.nn.Module) -> torch.nn.Module:
    """The student without any training wrappers, in eval mode."""
    return student.eval().requires_grad_(False)


def main() -> None:
    entry(run, "distill")


if __name__ == "__main__":
    main()
