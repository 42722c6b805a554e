"""Model registry: record a distilled student in MLflow and promote it by a metric gate.

This is the only component that imports MLflow. A registration is one MLflow run (params, metrics,
artifacts, lineage tags, model card) that logs the student folder as a pyfunc model, registers it as
a new version of ``model_name`` and points the ``candidate`` alias at it. ``should_promote`` then
compares it with the version behind the ``champion`` alias and moves that alias if it wins.
A registered model holds the students of one teacher only (its ``teacher`` tag).

The review helpers (``version_record``, ``registry_overview``, ``set_alias``, ``find_runs``) give
the registry's content as plain dicts to the command-line tools.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from components.registry.card import CARD_FILE
from components.registry.gate import (
    PROTOCOL,
    TAG_PROTOCOL,
    Decision,
    Lineage,
    RegisterConfig,
    should_promote,
)
from components.registry.lora import TAG_LORA, log_lora_student

MODEL_ARTIFACT = "student"
CARD_ARTIFACTS = "model_card"  # artifact folder of the model card and its grid
TAG_TEACHER = "teacher"  # registered-model tag: the one teacher whose students it holds
MAX_DESCRIPTION = 5000  # MLflow's limit on a model version's description
RegistryError = MlflowException  # what callers catch: unknown model or version, server errors
# Runtime packages of the pyfunc model; pinned to the versions installed when it is logged.
MODEL_REQUIREMENTS = ("mlflow", "torch", "diffusers", "transformers", "safetensors", "numpy",
                      "pandas", "pillow")
# The pyfunc model is logged as code (MLflow "models from code"), not as a pickle: this script is
# the model's entry point and ``components/`` travels with it as code.
MODEL_CODE = '''"""MLflow entry point of a Distillery student (written by components.registry.store)."""
import mlflow
from components.registry.store import StudentModel

mlflow.models.set_model(StudentModel())
'''


def tracking_uri(root: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite store ``<root>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_location(root: str | Path, uri: str) -> str | None:
    """Artifact root for new experiments: ``<root>/mlartifacts`` for a local store.

    A sqlite store would otherwise put artifacts in ``./mlruns`` of whatever the working folder
    is. For a tracking server (http) the server decides (``None``).
    """
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (Path(root).resolve() / "mlartifacts").as_uri()
    return None


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to dotted keys: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class StudentModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper of a student folder: prompts in, uint8 images (N, H, W, 3) out."""

    def load_context(self, context: Any) -> None:
        from components.generation import load_student

        self.student = load_student(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """Images for a DataFrame with ``prompt`` (and optional ``seed``) or a list of prompts.

        Without seeds, image i is seeded with i. Returns uint8 (N, H, W, 3).
        """
        prompts, seeds = prompts_and_seeds(model_input)
        return self.student.generate(prompts, seeds)


def prompts_and_seeds(model_input: Any) -> tuple[list[str], list[int]]:
    """Normalise pyfunc input (DataFrame, list of prompts, one prompt) to prompts and seeds."""
    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, pd.Series):
        model_input = model_input.tolist()
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(f"expected a 'prompt' column, got {list(model_input.columns)}")
        prompts = [str(p) for p in model_input["prompt"]]
        if "seed" in model_input.columns:
            return prompts, [int(s) for s in model_input["seed"]]
        return prompts, list(range(len(prompts)))
    if isinstance(model_input, (list, tuple, np.ndarray)) and all(
            isinstance(p, str) for p in model_input):
        return list(model_input), list(range(len(model_input)))
    raise TypeError("expected a DataFrame with a 'prompt' column or a list of prompt strings, "
                    f"got {type(model_input).__name__}")


def register_student(cfg: RegisterConfig, student_dir: str | Path, metrics: Mapping[str, Any],
                     lineage: Lineage, *, uri: str, artifact_root: str | None = None,
                     params: Mapping[str, Any] | None = None,
                     artifacts: Sequence[str | Path] = (), run_name: str = "register",
                     model_card: str | None = None, card_files: Sequence[str | Path] = (),
                     identity: Mapping[str, str] | None = None,
                     base_model: str | None = None) -> dict:
    """Log, register and gate one student; returns run_id, version, promoted, reason, champion,
    experiment_id, run_url (a link for an http tracking server, else None) and reused.

    ``metrics`` may be nested (flattened to dotted names; non-numbers are skipped); ``params`` are
    the resolved stage configs; ``artifacts`` are files or folders (grids, eval card, configs);
    ``model_card`` (markdown) is logged with ``card_files`` under ``model_card/`` and becomes the
    version's description. ``identity`` (e.g. the student's weights hash and its eval card's
    hash) names what makes two registrations the same student: a version whose tags hold the
    same identity is reused (alias ``candidate``, gated again), not registered twice. Raises
    ``ValueError`` if ``model_name`` holds another teacher's students.
    """
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    _claim_model(client, cfg.model_name, lineage.teacher)
    experiment_id = _experiment_id(client, cfg.experiment, artifact_root)
    same = _same_student(client, cfg.model_name, identity) if identity else None
    if same is not None:
        run_id, version = same.run_id, str(same.version)
        record = gate_record(version_record(client, cfg.model_name, version))
    else:
        run_id, version, record = _register_new(
            client, cfg, Path(student_dir), metrics, lineage, experiment_id, params or {},
            artifacts, run_name, model_card, card_files, identity or {}, base_model)
    client.set_registered_model_alias(cfg.model_name, cfg.candidate_alias, version)
    decision = _gate(client, cfg, version, record)
    champion = client.get_registered_model(cfg.model_name).aliases.get(cfg.champion_alias)
    return {"run_id": run_id, "version": version, "promoted": decision.promote,
            "reason": decision.reason, "champion": None if champion is None else str(champion),
            "model_uri": f"models:/{cfg.model_name}@{cfg.candidate_alias}", "tracking_uri": uri,
            "model_name": cfg.model_name, "experiment_id": experiment_id,
            "run_url": run_url(uri, experiment_id, run_id), "reused": same is not None,
            "lora_model_uri": client.get_model_version(cfg.model_name, version).tags.get(
                TAG_LORA)}


def _register_new(client, cfg, student_dir, metrics, lineage, experiment_id, params, artifacts,
                  run_name, model_card, card_files, identity,
                  base_model) -> tuple[str, str, dict]:
    """One MLflow run with everything about the student and a new registered version of it;
    returns the run id, the version and the record the gate compares."""
    numeric = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
    tags = {**lineage.tags(), **identity}
    with _tracking(client.tracking_uri), mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        # 1. what was trained and how it scored
        _log_params(client, run.info.run_id, flatten(params))
        for key, value in numeric.items():
            mlflow.log_metric(key, value)
        for path in map(Path, artifacts):
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            else:
                mlflow.log_artifact(str(path))
        if model_card is not None:
            mlflow.log_text(model_card, f"{CARD_ARTIFACTS}/{CARD_FILE}")
            for path in card_files:
                mlflow.log_artifact(str(path), artifact_path=CARD_ARTIFACTS)
        # 2. the student itself, as a pyfunc model, and a new registered version of it (the
        # client's call: the model exists already, so MLflow's fluent one would say so)
        info = _log_model(student_dir)
        lora = log_lora_student(student_dir, base_model)  # None for a full student
        version_tags = {**tags, **({TAG_LORA: lora.model_uri} if lora else {})}
        version = str(client.create_model_version(
            cfg.model_name, info.model_uri, run_id=run.info.run_id, tags=version_tags,
            model_id=info.model_id).version)
    if model_card is not None:
        client.update_model_version(cfg.model_name, version,
                                    description=model_card[:MAX_DESCRIPTION])
    return run.info.run_id, version, {**numeric, PROTOCOL: lineage.eval_protocol}


def _same_student(client: MlflowClient, name: str, identity: Mapping[str, str]):
    """The newest version of ``name`` whose tags hold ``identity``, or None."""
    versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
    same = [v for v in versions if all(v.tags.get(k) == val for k, val in identity.items())]
    return max(same, key=lambda v: int(v.version)) if same else None


def _gate(client: MlflowClient, cfg: RegisterConfig, version: str, record: dict):
    """The promotion gate for ``version`` against the current champion; moves the alias if it
    wins and records the reason on the version (and its run)."""
    champion = client.get_registered_model(cfg.model_name).aliases.get(cfg.champion_alias)
    if champion is not None and str(champion) == version:
        decision = Decision(False, f"already the champion (version {version})")
    else:
        decision = should_promote(record, _champion_record(client, cfg), cfg)
    if decision.promote:
        client.set_registered_model_alias(cfg.model_name, cfg.champion_alias, version)
    client.set_model_version_tag(cfg.model_name, version, "promotion", decision.reason)
    client.set_tag(client.get_model_version(cfg.model_name, version).run_id, "promotion",
                   decision.reason)
    return decision


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run on a tracking server; None for a local store (no UI URL)."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _claim_model(client: MlflowClient, name: str, teacher: str) -> None:
    """Create ``name`` for ``teacher``, or check that it already belongs to that teacher."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, tags={TAG_TEACHER: teacher},
                                       description=f"one-step students of the teacher {teacher}")
        return
    owner = model.tags.get(TAG_TEACHER)
    if owner is None:
        client.set_registered_model_tag(name, TAG_TEACHER, teacher)
    elif owner != teacher:
        raise ValueError(f"registered model {name!r} holds students of teacher {owner!r}, not "
                         f"{teacher!r}: one registered model per teacher; set register.model_name "
                         "in params.yaml to a name for this teacher")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block, then restore the previous setting."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets it again


def _experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start:start + 100])


def _log_model(student_dir: Path):
    """Log ``student_dir`` as the artifact of a pyfunc model in the active run; returns its
    ``ModelInfo`` (``model_uri``, ``model_id``)."""
    if not student_dir.is_dir():
        raise FileNotFoundError(f"student folder {student_dir} does not exist")
    import components

    signature = ModelSignature(inputs=None, outputs=Schema(
        [TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # inputs are free-form (DataFrame or list of prompts), so MLflow's example check is moot
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        code = Path(tmp) / "student_model.py"
        code.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(code),
            artifacts={MODEL_ARTIFACT: str(student_dir)},
            code_paths=[str(Path(components.__file__).parent)],
            pip_requirements=_requirements(), signature=signature)
    return info


def _requirements() -> list[str]:
    reqs = []
    for name in MODEL_REQUIREMENTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            reqs.append(f"{name}=={metadata.version(name)}")
    return reqs


def _champion_record(client: MlflowClient, cfg: RegisterConfig) -> dict[str, Any] | None:
    """Metrics and protocol of the champion's run, or None when no version holds the alias."""
    version = client.get_registered_model(cfg.model_name).aliases.get(cfg.champion_alias)
    if version is None:
        return None
    return gate_record(version_record(client, cfg.model_name, str(version)))


# ---------------------------------------------------------------- review


def gate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """What ``should_promote`` compares, from a ``version_record``: its metrics and protocol."""
    return {**record["metrics"], PROTOCOL: record["tags"].get(TAG_PROTOCOL)}


def version_record(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    """One model version as a plain dict: version, aliases, tags (the run's, MLflow's own left
    out, then the version's), run id, metrics, params."""
    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id)
    return {"name": name, "version": str(mv.version), "aliases": sorted(mv.aliases or []),
            "run_id": mv.run_id, "created_ms": mv.creation_timestamp,
            "tags": {**{k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
                     **mv.tags}, "metrics": dict(run.data.metrics),
            "params": dict(run.data.params),
            "run_url": run_url(client.tracking_uri, run.info.experiment_id, mv.run_id)}


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_record(uri: str, name: str, alias: str) -> dict[str, Any] | None:
    """``version_record`` of the version behind ``alias``, or None when no version holds it."""
    client = client_for(uri)
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else version_record(client, name, str(version))


def registry_overview(uri: str) -> list[dict[str, Any]]:
    """Every registered model: name, teacher, aliases (alias → version) and number of versions."""
    client = client_for(uri)
    out = []
    for model in client.search_registered_models(max_results=1000):
        versions = client.search_model_versions(f"name = '{model.name}'", max_results=10000)
        out.append({"name": model.name, "teacher": model.tags.get(TAG_TEACHER),
                    "aliases": {k: str(v) for k, v in sorted(model.aliases.items())},
                    "versions": sorted((str(v.version) for v in versions), key=int)})
    return sorted(out, key=lambda m: m["name"])


def set_alias(uri: str, name: str, alias: str, version: str, note: str) -> None:
    """Point ``alias`` of ``name`` at ``version`` and record why on the version."""
    client = client_for(uri)
    client.get_model_version(name, version)  # a clear error if it does not exist
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", note)


def tag_lineage(uri: str, run_id: str, tags: Mapping[str, str], model_name: str | None = None,
                version: str | None = None) -> None:
    """Add lineage tags (e.g. the DVC experiment that holds the run's params and lock) to a run
    and, when given, to its model version."""
    client = client_for(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
        if model_name and version:
            client.set_model_version_tag(model_name, version, key, str(value))


def log_stopped_run(uri: str, experiment: str, artifact_root: str | None,
                    stopped: Mapping[str, Any], params: Mapping[str, Any],
                    artifacts: Sequence[str | Path] = ()) -> str:
    """A distillation the training monitor stopped, as an MLflow run with status FAILED:
    ``stopped`` (step, reason, method, teacher) as ``monitor.*`` tags, the params, and the
    artifacts logged so far (sample grids, the loss rows); returns its run id. Registration's
    own queries (``find_runs``) read finished runs only. A store that refuses raises
    ``OSError``."""
    try:
        client = client_for(uri)
        experiment_id = _experiment_id(client, experiment, artifact_root)
        tags = {f"monitor.{k}": str(v) for k, v in stopped.items()}
        run = client.create_run(experiment_id,
                                run_name=f"distill stopped at step {stopped['step']}",
                                tags={**tags, "mlflow.note.content": str(stopped["reason"])})
        run_id = run.info.run_id
        _log_params(client, run_id, flatten(params))
        for path in map(Path, artifacts):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=path.name)
            elif path.exists():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status="FAILED")
    except MlflowException as err:  # an unreachable or refusing store: the caller decides
        raise OSError(f"MLflow at {uri}: {err}") from err
    return run_id


def find_runs(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Finished runs of ``experiment``, oldest first: run id, name, params, metrics and tags."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              max_results=5000, order_by=["attributes.start_time ASC"])
    return [{"run_id": r.info.run_id, "run_name": r.info.run_name,
             "start_ms": r.info.start_time, "params": dict(r.data.params),
             "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)} for r in runs]
