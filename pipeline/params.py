"""Strict loading of ``params.yaml``: one frozen config per stage, built from its sections.

Unknown top-level sections, unknown keys and wrong types fail at load time with the valid keys
named; the method name is checked against the method registry. Check the whole file before a
``dvc repro`` (DVC deletes a stage's outputs before the stage can reject its params):

    uv run python -m pipeline.params --check
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from components.config import ConfigError, from_dict
from components.embed_cache import CacheConfig
from components.evaluation.protocols import get_protocol
from components.generation import precision_dtype
from components.methods import get_method, lora_unsupported, method_names, teacher_unsupported
from components.monitor import MonitorConfig
from components.networks import UnsupportedTeacherError, folder_traits
from components.policy import PolicyConfig
from components.prompts import PromptsConfig, source_path
from components.student import StudentConfig
from components.teacher import TeacherConfig, TeacherNotFoundError, resolve_model
from components.training import LoopConfig
from pipeline import paths
from pipeline.stages.common import undeclared

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class DistillConfig:
    """``params.yaml: distill``: the method, the loop, a section of settings per method, the
    training policy (precision, checkpointing, compile) and the process count (``processes`` > 1
    runs the stage under ``torch.distributed.run``, one process per GPU). ``student``: what the
    student trains, full weights or a LoRA (``components.student``); ``monitor``: the training
    monitor's checks and whether a flagged run warns or stops (``components.monitor``)."""

    method: str
    loop: LoopConfig
    methods: dict = field(default_factory=dict)
    student: StudentConfig = field(default_factory=StudentConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    processes: int = 1
    device: str = "cpu"
    sample_prompts: int = 8
    sample_seed: int = 0
    proxy_fid_images: int = 0  # >0: FID of this many student images at every sample step
    keep_runs: int = 2  # checkpoint folders kept: this run's and the last other runs'
    # the student saved: the weights at the last step, or at the lowest proxy FID of the run
    # (kept in the run's folder whenever the proxy FID is measured)
    save: str = "last"

    def validate(self) -> None:
        for key in ("sample_prompts", "keep_runs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.proxy_fid_images < 0 or self.proxy_fid_images == 1:
            raise ValueError(f"proxy_fid_images must be 0 (off) or at least 2 (FID needs "
                             f"a covariance), got {self.proxy_fid_images}")
        if self.save not in ("last", "best"):
            raise ValueError(f"save must be 'last' or 'best' (the lowest proxy FID), got "
                             f"{self.save!r}")
        if self.save == "best" and not self.proxy_fid_images:
            raise ValueError("save: best keeps the weights of the lowest proxy FID, which is "
                             "off (proxy_fid_images: 0): set proxy_fid_images >= 2, or save: "
                             "last")
        valid = method_names()
        if self.method not in valid:
            raise ValueError(f"unknown method {self.method!r}; valid methods are: "
                             f"{', '.join(valid)}")
        for name in self.methods:
            if name not in valid:
                raise ValueError(f"methods.{name}: unknown method; valid methods are: "
                                 f"{', '.join(valid)}")
        for name, section in self.methods.items():
            cfg_cls, _ = get_method(name)
            from_dict(cfg_cls, section or {}, f"distill.methods.{name}")
        if self.student.kind == "lora" and (why := lora_unsupported(self.method)):
            raise ValueError(f"student.kind 'lora' does not apply to method {self.method!r}: "
                             f"{why}; use student.kind: full, or a score method (dmd2, sid_lsg, "
                             "swiftbrush)")
        if self.processes < 1:
            raise ValueError(f"distill.processes must be >= 1, got {self.processes}")
        per = self.loop.batch_size / self.processes
        if self.loop.batch_size % (self.processes * self.loop.grad_accum):
            raise ValueError(
                f"distill.loop.batch_size {self.loop.batch_size} over {self.processes} "
                f"process(es) gives {per:g} per process, not divisible into grad_accum "
                f"{self.loop.grad_accum} micro-batches: make batch_size a multiple of "
                f"processes x grad_accum = {self.processes * self.loop.grad_accum}")

    def method_config(self) -> Any:
        """The chosen method's typed config (published defaults where params say nothing)."""
        cfg_cls, _ = get_method(self.method)
        return from_dict(cfg_cls, self.methods.get(self.method) or {},
                         f"distill.methods.{self.method}")


@dataclass(frozen=True)
class ReferenceConfig:
    """``params.yaml: reference``: the FID reference image set, its protocol's preprocessing and
    the feature network. ``keep_features``: how many reference features (a seeded subset) the
    stage output keeps for KID and precision/recall (0: none)."""

    images: str = "data/world/reference/images"
    protocol: str = "world"
    feature_weights: str = "fid-helper"
    batch_size: int = 64
    keep_features: int = 10000
    device: str = "cpu"  # where Inception runs (fp32: the FID features are defined in fp32)

    def validate(self) -> None:
        if self.feature_weights not in ("fid-helper", "torch-fidelity"):
            raise ValueError(f"feature_weights {self.feature_weights!r} is not one of "
                             "'fid-helper' (offline file), 'torch-fidelity' (its own download)")
        get_protocol(self.protocol)
        if self.keep_features < 0:
            raise ValueError("keep_features must be >= 0")


@dataclass(frozen=True)
class EvaluateConfig:
    """``params.yaml: evaluate``: the evaluation protocol, for the student and the teacher.

    ``captions``: the protocol's caption file (the world: ``prepare_prompts``' eval.json; COCO:
    the GigaGAN caption list or ``captions_val2017.json``). ``num_images``: null for the whole
    protocol; fewer makes a proxy that the eval card marks incomplete. ``scorer``: null for the
    protocol's CLIP model, else a local open_clip folder or ``"<model>:<tag or checkpoint>"``.
    ``curve_guidance_scales``: the teacher's FID-CLIP curve (empty: no curve).
    """

    protocol: str = "world"
    captions: str = "data/prompts/eval.json"
    num_images: int | None = None
    seed: int = 0
    teacher_steps: int = 25
    teacher_guidance_scale: float = 3.0
    curve_guidance_scales: tuple[float, ...] = ()
    scorer: str | None = "models/scorer"
    batch_size: int = 32
    grid_images: int = 16
    latency_repeats: int = 5
    latency_warmup: int = 2
    kid: bool = True
    precision_recall: bool = True
    device: str = "cpu"
    precision: str = "fp32"  # the generating networks (fp32 or bf16); Inception and CLIP: fp32

    def validate(self) -> None:
        precision_dtype(self.precision)
        protocol = get_protocol(self.protocol)
        if self.num_images is not None and self.num_images < 2:
            raise ValueError("num_images must be at least 2 (FID needs a covariance)")
        if protocol.size and self.num_images and self.num_images > protocol.size:
            raise ValueError(f"num_images {self.num_images} exceeds protocol {self.protocol}'s "
                             f"{protocol.size} images")
        if self.teacher_steps < 1:
            raise ValueError("teacher_steps must be at least 1")
        if any(s < 0 for s in self.curve_guidance_scales):
            raise ValueError("curve_guidance_scales must be >= 0 (diffusers' s; 1 = no guidance)")
        if self.scorer is None and protocol.clip_model is None:
            raise ValueError(f"protocol {self.protocol!r} has no published CLIP model; set "
                             "`evaluate.scorer` (the world's: models/scorer)")
        if self.latency_repeats < 1 or self.latency_warmup < 0:
            raise ValueError("latency_repeats must be >= 1 and latency_warmup >= 0")

    def dtype(self) -> torch.dtype:
        """The dtype the teacher and the student generate in (``precision``)."""
        return precision_dtype(self.precision)

    def scorer_spec(self) -> str:
        """The CLIP scorer to load: the configured one, else the protocol's published model."""
        return self.scorer or get_protocol(self.protocol).clip_model


# Section name -> config class. Stages that own further sections add them in ``SECTIONS``.
SECTIONS: dict[str, type] = {
    "prompts": PromptsConfig,
    "teacher": TeacherConfig,
    "cache": CacheConfig,
    "distill": DistillConfig,
    "reference": ReferenceConfig,
    "evaluate": EvaluateConfig,
}


def read_params(root: str | Path) -> dict:
    path = Path(root) / PARAMS_FILE
    if not path.exists():
        raise ConfigError(f"{path} not found; copy one of pipeline/presets/*.yaml to "
                          f"{PARAMS_FILE} or run from the project root")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections")
    _register_late_sections()
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(map(repr, unknown))}; valid "
                          f"sections are: {', '.join(sorted(SECTIONS))}")
    return data


def load_stage(root: str | Path, stage: str) -> dict[str, Any]:
    """Validate the whole params file; return only the sections ``stage`` declares in dvc.yaml
    (a ``"section.key"`` entry is that key's value)."""
    from pipeline.stages import STAGE_SECTIONS

    configs = load_all(root)
    out = {}
    for name in STAGE_SECTIONS[stage]:
        section, _, key = name.partition(".")
        out[name] = getattr(configs[section], key) if key else configs[section]
    return out


def load_all(root: str | Path) -> dict[str, Any]:
    """Every section of the params file as its config dataclass (all validated)."""
    data = read_params(root)
    missing = sorted(set(SECTIONS) - set(data))
    if missing:
        raise ConfigError(f"{Path(root) / PARAMS_FILE}: missing section(s) "
                          f"{', '.join(map(repr, missing))}")
    configs = {name: from_dict(cls, data[name], name) for name, cls in SECTIONS.items()}
    family = world_family(configs["teacher"], configs["world"])
    check_teacher(root, configs["teacher"], configs["distill"], family)
    if family not in (None, "unet"):  # one registered model per world teacher family
        register = configs["register"]
        configs["register"] = replace(register, model_name=f"{register.model_name}-{family}")
    return configs


def world_family(teacher: TeacherConfig, world: Any) -> str | None:
    """The family of the world teacher that ``teacher.model`` names (``world.teacher``), or None
    when the teacher is not the world's (a folder or hub id of the user's).

    A world teacher of a flow family registers under ``<register.model_name>-<family>``, so
    ``dvc exp run -S world.teacher=sd3`` needs no other change and the registry keeps one
    registered model (and one champion) per teacher."""
    return world.teacher if Path(teacher.model) == paths.TEACHER else None


def check_teacher(root: str | Path, teacher: TeacherConfig, distill: DistillConfig,
                  world_teacher: str | None = None) -> None:
    """The teacher folder's family (from its configs, no weights) is supported, and the method
    applies to it; a hub id is checked when the stage loads it. The world's teacher, before
    bootstrap has built it, is of ``world.teacher``'s family."""
    try:
        folder = Path(resolve_model(teacher.model, Path(root)))
    except TeacherNotFoundError:
        return  # the stage's own loading says how to supply it
    try:
        traits = folder_traits(folder) if folder.is_dir() else None
    except UnsupportedTeacherError as err:
        raise ConfigError(f"teacher.model: {err}") from None
    if traits is None and world_teacher is not None:
        traits = {"family": world_teacher, "embedded_guidance": False}
    if traits is None:
        return
    why = teacher_unsupported(distill.method, distill.method_config(), traits)
    if why:
        raise ConfigError(f"distill.method {distill.method!r} does not apply to the "
                          f"{traits['family']} teacher {teacher.model}: {why}")


def _register_late_sections() -> None:
    """Sections whose config classes live in heavier component packages."""
    from components.evaluation.scorer import ScorerConfig
    from components.registry.gate import RegisterConfig
    from components.world.config import WorldConfig

    SECTIONS.update(world=WorldConfig, scorer=ScorerConfig, register=RegisterConfig)


def input_errors(root: str | Path, configs: dict[str, Any]) -> list[str]:
    """The input paths params name (FID reference images, evaluation captions, prompt files)
    that do not exist and that no stage of ``root/dvc.yaml`` produces: under ``dvc repro`` DVC
    would stop with a bare "No such file" before the stage could say what to set; and the prompt
    files that are not dependencies of ``prepare_prompts`` (edits to them would go unseen)."""
    root = Path(root)
    dvc_file = root / "dvc.yaml"
    stages = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"] if (
        dvc_file.exists()) else {}
    produced = [(root / next(iter(o)) if isinstance(o, dict) else root / o).resolve()
                for stage in stages.values() for o in stage.get("outs", [])]
    prompts, reference, evaluate = configs["prompts"], configs["reference"], configs["evaluate"]
    named = [("reference.images", reference.images,
              "a folder of FID reference images (COCO: val2014/ or val2017/)"),
             ("evaluate.captions", evaluate.captions, "the protocol's caption file"),
             *((f"prompts.train_sources[{i}].path", s.path, "a prompt file")
               for i, s in enumerate(prompts.train_sources)),
             ("prompts.eval_source.path", prompts.eval_source.path, "a caption file")]
    errors = []
    for key, value, what in named:
        path = (root / value).resolve()
        if not path.exists() and not any(p == path or p in path.parents for p in produced):
            errors.append(f"{key}: {value} does not exist and no stage produces it; set it to "
                          f"{what}")
    return errors + undeclared_sources(root, prompts)


def undeclared_sources(root: Path, prompts: PromptsConfig) -> list[str]:
    """A line for each prompt file that is not a dependency of ``prepare_prompts`` in
    ``root/dvc.yaml``: editing it would leave the prompts stale while `dvc status` says up to
    date (checked by ``--check`` and by the stage itself)."""
    sources = [*((f"prompts.train_sources[{i}].path", s)
                 for i, s in enumerate(prompts.train_sources)),
               ("prompts.eval_source.path", prompts.eval_source)]
    missing = set(undeclared(root, "prepare_prompts", [source_path(s, root) for _, s in sources]))
    return [f"{key}: {s.path} is not a dependency of prepare_prompts in dvc.yaml, so `dvc repro` "
            "would not see it change: move it under data/sources/ (a declared folder) or add "
            "its path to the stage's deps in dvc.yaml"
            for key, s in sources if source_path(s, root) in missing]


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.params --check``: validate every section and the input paths; a line
    per problem, exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.params",
        description="Validate params.yaml (every section, key, type and method name) before any "
                    "stage runs: under `dvc repro`, DVC deletes a stage's outputs before the "
                    "stage itself can reject bad params.")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--check", action="store_true", required=True,
                        help="validate every section of params.yaml")
    args = parser.parse_args(argv)
    try:
        configs = load_all(args.root)
        errors = input_errors(args.root, configs)
    except ConfigError as err:
        errors = [str(err)]
    for error in errors:
        print(f"params: error: {error}", file=sys.stderr)
    if errors:
        raise SystemExit(2)
    print(f"{Path(args.root) / PARAMS_FILE}: valid ({', '.join(configs)})")


if __name__ == "__main__":
    main()
