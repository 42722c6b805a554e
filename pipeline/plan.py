"""Plan a distillation run before any GPU is touched: memory per GPU, time, GPU-hours.

    uv run python -m pipeline.plan                                # the configured run (params.yaml)
    uv run python -m pipeline.plan --preset sd15 --method dmd2    # a published recipe
    uv run python -m pipeline.plan --arch sdxl --method sid_lsg --precision bf16 \\
        --activation-checkpointing --global-batch 512 --micro-batch 2 --gpus 8 --gpu-memory 80
    uv run python -m pipeline.plan --preset sdxl --arch flux1 --method swiftbrush  # a flow teacher
    uv run python -m pipeline.plan --arch flux1 --prompts 1000000 --text-embeddings on_the_fly
    uv run python -m pipeline.plan --stage evaluate --preset sdxl --method dmd2   # or cache_teacher

One complete iteration of the real method (every optimizer group, the optimizer steps, the EMA
update) runs through the real training loop and policy on ``meta`` tensors of the teacher's real
architecture (``components.planning``): nothing is allocated and nothing is downloaded. Prints
the plan and writes it as JSON (``--out``); the distill stage writes the same plan next to its
outputs (``outputs/distill/plan.json``) and refuses to start on a GPU with too little free memory.
The plan also says whether the prompts' text embeddings should be cached on disk or encoded on
the fly (``cache.text_embeddings``; ``components.planning.text``): the disk the cache of every
training prompt takes against ``--disk-budget``, and the GPU memory and time the text encoders
take otherwise (counted in the memory and time when that mode is configured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from components.architectures import ARCHS, scheduler_config, unet_config
from components.config import ConfigError
from components.flow_architectures import FLOW_ARCHS
from components.generation import precision_dtype
from components.methods import get_method, method_names, teacher_unsupported
from components.networks import folder_traits
from components.planning import (
    GPUS,
    PlanRequest,
    TeacherSpec,
    estimate,
    flow_spec,
    get_gpu,
    make_plan,
    shortened_config,
    traceable_config,
)
from components.planning.estimate import GIB
from components.planning.teachers import TEXT_LENGTHS, prompt_values
from components.planning.text import (
    DISK_BUDGET_GIB,
    MODES,
    TextRequest,
    encoder_of,
    folder_encoder_configs,
)
from components.policy import PRECISIONS
from components.teacher import TeacherNotFoundError, resolve_model
from pipeline import paths
from pipeline.params import load_all

RESULTS = Path("bench/results")


def teacher_spec(teacher_cfg, root: Path, arch: str | None = None) -> TeacherSpec:
    """The named architecture's configs, else the configured teacher folder's (configs only)."""
    if arch in FLOW_ARCHS:
        return flow_spec(arch)
    if arch:
        return TeacherSpec(unet_config(arch), scheduler_config(arch))
    from diffusers import DDIMScheduler, UNet2DConditionModel

    source = resolve_model(teacher_cfg.model, root)
    traits = folder_traits(source) if Path(source).is_dir() else None
    if traits and traits["family"] != "unet":
        return _flow_folder_spec(Path(source), traits["family"])
    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet",
                                                revision=teacher_cfg.revision)
        sched = DDIMScheduler.load_config(source, subfolder="scheduler",
                                          revision=teacher_cfg.revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the teacher's configs from {source} ({err}); name an "
                          f"architecture with --arch ({', '.join(ARCHS)})") from None
    return TeacherSpec(dict(unet), dict(sched))


def _flow_folder_spec(folder: Path, family: str) -> TeacherSpec:
    """A flow teacher folder's transformer and scheduler configs (no weights)."""
    def read(part: str) -> dict:
        config = json.loads((folder / part / "scheduler_config.json" if part == "scheduler"
                             else folder / part / "config.json").read_text())
        return {k: v for k, v in config.items() if not k.startswith("_")}
    return TeacherSpec(read("transformer"), read("scheduler"), TEXT_LENGTHS[family], family)


def encoder_configs(teacher_cfg, root: Path, arch: str | None) -> dict[str, dict] | None:
    """The teacher's text encoder configs by pipeline slot: the named architecture's, else the
    teacher folder's (None for a hub id: its configs are not here)."""
    if arch in FLOW_ARCHS:
        from components.flow_architectures import text_configs as flow_text_configs

        return flow_text_configs(arch)
    if arch:
        from components.architectures import text_configs

        return dict(zip(("text_encoder", "text_encoder_2"), text_configs(arch)))
    try:
        source = Path(resolve_model(teacher_cfg.model, root))
    except TeacherNotFoundError:
        return None
    return folder_encoder_configs(source) if (source / "model_index.json").is_file() else None


def text_request(teacher_cfg, root: Path, spec: TeacherSpec, arch: str | None, mode: str,
                 storage: str, precision: str, prompts: int | None,
                 disk_budget_gib: float = DISK_BUDGET_GIB) -> TextRequest | None:
    """The text side of the plan (``components.planning.text``); None when the teacher's text
    encoder configs are not here."""
    import torch

    configs = encoder_configs(teacher_cfg, root, arch)
    if not configs:
        return None
    encoders = tuple(encoder_of(slot, config, spec.family, spec.text_length)
                     for slot, config in configs.items())
    def size(dtype: torch.dtype) -> int:
        return torch.finfo(dtype).bits // 8

    return TextRequest(mode, prompts, size(getattr(torch, storage)),
                       size(precision_dtype(precision)), encoders, prompt_values(spec),
                       disk_budget_gib)


def prompt_count(root: Path) -> int | None:
    """Training prompts prepared by prepare_prompts (None before it has run)."""
    path = root / paths.TRAIN_PROMPTS
    if not path.is_file():
        return None
    return len(path.read_text(encoding="utf-8").splitlines())


def request(teacher: TeacherSpec, cfg, gpu: str = "H100", gpu_memory: float | None = None,
            root: Path = Path("."), text: TextRequest | None = None) -> PlanRequest:
    """The plan request of a ``DistillConfig`` (``params.yaml: distill``)."""
    _, factory = get_method(cfg.method)
    why = teacher_unsupported(cfg.method, cfg.method_config(), teacher.traits)
    if why:
        raise ConfigError(f"distill.method {cfg.method!r} does not apply to the "
                          f"{teacher.family} teacher: {why}")
    method_cfg, notes = traceable_config(cfg.method_config())
    method_cfg, repeats = shortened_config(method_cfg)
    steps = cfg.loop.steps
    card = get_gpu(gpu)
    def build(t):  # the configured student (full weights or a LoRA) on the traced teacher
        return factory(method_cfg, dataclasses.replace(t, student=cfg.student), steps)
    return PlanRequest(cfg.method, build, teacher, cfg.policy,
                       cfg.loop.batch_size, cfg.loop.grad_accum, cfg.processes, steps, card,
                       gpu_memory or card.memory_gib, root / RESULTS, tuple(notes), repeats,
                       text)


def distill_config(root: Path, preset: str | None, method: str | None):
    """The teacher, distill and cache configs of params.yaml, or of a preset with its method."""
    configs = stage_configs(root, preset, method)
    return configs["teacher"], configs["distill"], configs["cache"]


def stage_configs(root: Path, preset: str | None, method: str | None) -> dict:
    """The params sections the plans read (teacher, distill, cache, evaluate) of params.yaml,
    or of a preset with its method."""
    def read(folder) -> dict:
        out = load_all(folder)  # the params file read and checked once
        cfg = out["distill"]
        return {"teacher": out["teacher"],
                "distill": replace(cfg, method=method) if method and not preset else cfg,
                "cache": out["cache"], "evaluate": out["evaluate"]}

    if preset is None:
        return read(root)
    from pipeline.configure import render_params

    text, _ = render_params(root, preset=preset, method=method)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text(text, encoding="utf-8")
        return read(tmp)


def _vae_config(teacher_cfg, root: Path, arch: str | None) -> dict | None:
    if arch in FLOW_ARCHS:
        from components.flow_architectures import vae_config as flow_vae

        return flow_vae(arch)
    if arch:
        from components.architectures import vae_config

        return vae_config(arch)
    try:
        config = Path(resolve_model(teacher_cfg.model, root)) / "vae" / "config.json"
    except TeacherNotFoundError:
        return None
    if not config.is_file():
        return None
    return {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}


UNTRACED = ("Inception (FID features) and the CLIP scorer are not traced (their architectures "
            "come with their weights)")


def inference_plan(stage: str, configs: dict, spec: TeacherSpec, arch: str | None,
                   text: TextRequest | None, gpu: str, gpu_memory: float | None,
                   root: Path, images: int | None = None) -> dict:
    """The plan of ``cache_teacher`` or ``evaluate`` (``components.planning.stages``)."""
    from components.evaluation.protocols import get_protocol
    from components.methods import needs_pairs
    from components.planning.gpus import efficiency, math_mode
    from components.planning.stages import (
        Work,
        decode_call,
        guided_call,
        stage_plan,
        student_call,
    )

    card = get_gpu(gpu)
    cache, evaluate, distill = configs["cache"], configs["evaluate"], configs["distill"]
    precision = cache.precision if stage == "cache_teacher" else evaluate.precision
    bf16 = precision == "bf16"
    mode = math_mode(precision, False)
    eff, _ = efficiency(card, mode, root / RESULTS)
    rate = estimate.rate(card, mode, eff)
    notes = []
    if stage == "cache_teacher":
        pairs = cache.pairs
        encoded = (text.prompts or 0) if text and text.mode == "disk" else 0
        calls, resident = [], []
        if pairs.count and needs_pairs(distill.method):
            guided_step = guided_call(spec, pairs.batch_size, bf16)
            calls.append((guided_step, pairs.steps, pairs.count))
            resident.append(guided_step)
        if text and text.mode == "on_the_fly":
            notes.append("cache.text_embeddings: on_the_fly: the prompts are encoded by distill")
        if text and text.prompts is None:
            notes.append("the number of training prompts is not known (pass --prompts N)")
        work = Work(tuple(calls), text, encoded, tuple(resident))
    else:
        protocol = get_protocol(evaluate.protocol)
        n = images or evaluate.num_images or protocol.size
        if n is None:
            raise ConfigError("the number of evaluation images is not known for protocol "
                              f"{evaluate.protocol!r}: pass --images N")
        student_steps = getattr(distill.method_config(), "generator_steps", 1)
        curves = len(evaluate.curve_guidance_scales)
        guided_step = guided_call(spec, evaluate.batch_size, bf16)
        student_step = student_call(spec, evaluate.batch_size, bf16)
        calls = [(guided_step, evaluate.teacher_steps, n * (1 + curves)),
                 (student_step, student_steps, n)]
        vae = _vae_config(configs["teacher"], root, arch)
        if vae:
            from components.generation import DECODE_CHUNK

            calls.append((decode_call(vae, spec.latent, min(DECODE_CHUNK, evaluate.batch_size)),
                          1, n * (2 + curves)))
        else:
            notes.append("the teacher's VAE config is not here: decoding is not counted")
        notes.append(UNTRACED)
        notes.append("the student's own VAE and text encoders (copies of the teacher's) are "
                     "counted once")
        resident = [guided_step, student_step] + ([calls[-1][0]] if vae else [])
        work = Work(tuple(calls), text, n * (2 + curves), tuple(resident))
    plan = stage_plan(stage, work, rate, gpu_memory or card.memory_gib, tuple(notes))
    plan["gpu"] = {"name": card.name, "math": mode, "efficiency": round(eff, 3)}
    return plan


def stage_summary(plan: dict) -> str:
    m = plan["memory_gib"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "total")
    lines = [(f"{plan['stage']} on {plan['gpu']['name']} ({plan['gpu']['math']}, efficiency "
              f"{plan['gpu']['efficiency']}): {m['total']:.2f} GiB of {plan['usable_gib']} "
              f"usable ({parts}): {'fits' if plan['fits'] else 'DOES NOT FIT'}")]
    for c in plan["calls"]:
        lines.append(f"  {c['name']}: {c['tflop_per_image']:.4g} TFLOP per image per call, "
                     f"{c['calls_per_item']} call(s) x {c['items']} image(s), batch "
                     f"{c['batch']}: {c['activation_gib']:.2f} GiB of activations")
    lines.append("time: " + ", ".join(f"{k} {v:.4g} s" for k, v in plan["seconds"].items())
                 + f"; {plan['gpu_hours']:.4g} GPU-hours")
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def _overrides(cfg, args):
    policy = cfg.policy
    if args.precision:
        policy = replace(policy, precision=args.precision)
    if args.activation_checkpointing is not None:
        policy = replace(policy, activation_checkpointing=args.activation_checkpointing)
    gpus = args.gpus or cfg.processes
    batch = args.global_batch or cfg.loop.batch_size
    accum = cfg.loop.grad_accum if not args.micro_batch else max(
        1, batch // (gpus * args.micro_batch))
    loop = replace(cfg.loop, batch_size=batch, grad_accum=args.grad_accum or accum,
                   steps=args.steps or cfg.loop.steps)
    return replace(cfg, policy=policy, processes=gpus, loop=loop)


def gpu_name(device: str) -> str:
    """The planner's name of the GPU ``device`` is (H100 when unknown or not a GPU)."""
    if not device.startswith("cuda"):
        return "H100"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return next((key for key, card in GPUS.items() if any(m in name for m in card.match)),
                "H100")


def free_memory(device: str) -> tuple[int, int] | None:
    """(free, total) bytes of the GPU ``device`` (``torch.cuda.mem_get_info``); None off GPUs."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.mem_get_info(torch.device(device))


def preflight(root: Path, teacher_cfg, cfg, device: str,
              text: Callable[[TeacherSpec], TextRequest | None] | None = None) -> dict | None:
    """The distill stage's plan, made before any weight loads (None for a teacher the planner
    cannot trace yet). On a GPU whose free memory is below the planned peak, a ``ValueError``
    carrying the plan's suggestion stops the stage."""
    try:
        resolve_model(teacher_cfg.model, root)
    except TeacherNotFoundError:
        return None  # no teacher here to plan for: the stage's own loading says so, in its turn
    try:
        spec = teacher_spec(teacher_cfg, root)
    except ConfigError as err:
        print(f"distill: no plan for this teacher ({err})", file=sys.stderr)
        return None
    memory = free_memory(device)
    req = request(spec, cfg, gpu_name(device), memory[1] / GIB if memory else None, root,
                  text(spec) if text else None)
    plan = make_plan(req, suggest=False)
    if memory and plan["memory_gib"]["total"] * GIB > memory[0]:
        total = req.gpu_memory_gib
        plan = make_plan(dataclasses.replace(req, gpu_memory_gib=memory[0] / GIB))  # same traces
        raise ValueError(
            f"the run needs {plan['memory_gib']['total']:.1f} GiB per GPU (planned peak with "
            f"allowances) but {device} has {memory[0] / GIB:.1f} GiB free of {total:.1f}; "
            f"{plan['recommendation']['suggestion']} (details: uv run python -m pipeline.plan)")
    return plan


def summary(plan: dict) -> str:
    """The plan in a few lines."""
    m, t, r = plan["memory_gib"], plan["time"], plan["recommendation"]
    run = plan["run"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "total")
    lines = [
        (f"{plan['method']}: global batch {run['global_batch']} = {run['gpus']} GPU(s) x "
         f"micro-batch {run['micro_batch']} x accumulation {run['grad_accum']}, "
         f"{run['steps']} iterations, policy {plan['policy']['precision']}"
         f"{' + checkpointing' if plan['policy']['activation_checkpointing'] else ''}"),
        (f"peak per GPU: {m['total']:.2f} GiB ({parts}) of {plan['usable_gib']} GiB usable "
         f"on {plan['gpu']['name']}: {'fits' if plan['fits'] else 'DOES NOT FIT'}"),
        (f"{t['tflop_per_image']:.3f} TFLOP per image, {t['seconds_per_iteration']:.2f} s per "
         f"iteration, {t['images_per_second']:.1f} images/s, {t['gpu_hours']:.0f} GPU-hours "
         f"(efficiency {plan['gpu']['efficiency']}, {plan['gpu']['efficiency_source']})"),
        f"recommendation: {r['suggestion']}",
        *([text_summary(plan["text_embeddings"])] if "text_embeddings" in plan else []),
        *(f"note: {n}" for n in plan["notes"])]
    return "\n".join(lines)


def text_summary(text: dict) -> str:
    disk = ("" if text["disk_gib"] is None else
            f", {text['disk_gib']:.4g} GiB for {text['prompts']} prompts")
    return (f"text embeddings ({text['mode']}): on disk {text['mb_per_prompt']:.4g} MB per "
            f"prompt{disk} (budget {text['disk_budget_gib']:g} GiB); on the fly "
            f"{text['encoders_gib']:.3g} GiB of encoders per GPU and "
            f"{text['on_the_fly_seconds_per_iteration']:.3g} s per iteration; recommended: "
            f"{text['recommended'] or 'neither'} ({text['reason']})")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("."), help="project root (params.yaml)")
    p.add_argument("--preset", help="a params preset (sd15, sd21, sdxl: published recipes)")
    p.add_argument("--arch", choices=ARCHS + FLOW_ARCHS, help="teacher architecture "
                   "(default: the configured teacher's, or the preset's)")
    p.add_argument("--method", choices=method_names())
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction)
    p.add_argument("--global-batch", type=int, help="images per iteration, all GPUs")
    p.add_argument("--micro-batch", type=int, help="images per GPU per accumulation round")
    p.add_argument("--grad-accum", type=int, help="accumulation rounds (instead of "
                   "--micro-batch)")
    p.add_argument("--gpus", type=int, help="GPUs (more than one: FSDP2 sharding)")
    p.add_argument("--steps", type=int, help="iterations of the run (GPU-hours)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="H100", help="GPU for time")
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: the GPU's)")
    p.add_argument("--prompts", type=int, help="training prompts (default: those "
                   "prepare_prompts wrote, if it has run)")
    p.add_argument("--text-embeddings", choices=MODES, help="plan with the text embeddings "
                   "cached on disk or encoded on the fly (default: cache.text_embeddings)")
    p.add_argument("--disk-budget", type=float, default=DISK_BUDGET_GIB,
                   help="GiB the embedding cache may take on disk (default %(default)g)")
    p.add_argument("--stage", choices=("distill", "cache_teacher", "evaluate"),
                   default="distill", help="the stage to plan (default %(default)s)")
    p.add_argument("--images", type=int, help="evaluate: images to generate (default: "
                   "evaluate.num_images, else the protocol's)")
    p.add_argument("--out", type=Path, help="write the plan JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    try:
        configs = stage_configs(args.root, args.preset, args.method)
        teacher_cfg, cfg, cache = configs["teacher"], configs["distill"], configs["cache"]
        arch = args.arch or (args.preset if args.preset in ARCHS else None)
        cfg = _overrides(cfg, args)
        cfg.validate()
        spec = teacher_spec(teacher_cfg, args.root, arch)
        prompts = args.prompts if args.prompts is not None else prompt_count(args.root)
        text = text_request(teacher_cfg, args.root, spec, arch,
                            args.text_embeddings or cache.text_embeddings, cache.dtype,
                            cache.precision, prompts, args.disk_budget)
        if args.stage != "distill":
            plan = inference_plan(args.stage, {**configs, "distill": cfg}, spec, arch, text,
                                  args.gpu, args.gpu_memory, args.root, args.images)
        else:
            plan = make_plan(request(spec, cfg, args.gpu, args.gpu_memory, args.root, text))
    except (ConfigError, ValueError) as err:
        sys.exit(f"plan: {err}")
    print(summary(plan) if args.stage == "distill" else stage_summary(plan))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
