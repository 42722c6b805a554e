"""Model registry: record a distilled student in MLflow and promote it by a metric gate.

This is the only component that imports MLflow. A registration is one MLflow run (params, metrics,
artifacts, lineage tags) that logs the student folder as a pyfunc model, registers it as a new
version of ``model_name`` and points the ``candidate`` alias at it. ``should_promote`` then
compares it with the version behind the ``champion`` alias and moves that alias if it wins.
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
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from components.registry.gate import PROTOCOL, TAG_PROTOCOL, Lineage, RegisterConfig, should_promote

MODEL_ARTIFACT = "student"
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
                     artifacts: Sequence[str | Path] = (), run_name: str = "register") -> dict:
    """Log, register and gate one student; returns run_id, version, promoted, reason, champion.

    ``metrics`` may be nested (flattened to dotted names; non-numbers are skipped); ``params`` are
    the resolved stage configs; ``artifacts`` are files or folders (grids, eval card, configs).
    """
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = _experiment_id(client, cfg.experiment, artifact_root)
    numeric = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
    with _tracking(uri), mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                          tags=lineage.tags()) as run:
        # 1. what was trained and how it scored
        _log_params(client, run.info.run_id, flatten(params or {}))
        for key, value in numeric.items():
            mlflow.log_metric(key, value)
        for path in map(Path, artifacts):
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            else:
                mlflow.log_artifact(str(path))
        # 2. the student itself, as a pyfunc model, and a new registered version of it
        model_uri = _log_model(Path(student_dir))
        version = mlflow.register_model(model_uri, cfg.model_name, tags=lineage.tags()).version
    client.set_registered_model_alias(cfg.model_name, cfg.candidate_alias, version)
    # 3. the gate against the current champion
    record = {**numeric, PROTOCOL: lineage.eval_protocol}
    decision = should_promote(record, _champion_record(client, cfg), cfg)
    if decision.promote:
        client.set_registered_model_alias(cfg.model_name, cfg.champion_alias, version)
    client.set_model_version_tag(cfg.model_name, version, "promotion", decision.reason)
    client.set_tag(run.info.run_id, "promotion", decision.reason)
    champion = client.get_registered_model(cfg.model_name).aliases.get(cfg.champion_alias)
    return {"run_id": run.info.run_id, "version": str(version), "promoted": decision.promote,
            "reason": decision.reason, "champion": None if champion is None else str(champion),
            "model_uri": f"models:/{cfg.model_name}@{cfg.candidate_alias}", "tracking_uri": uri}


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


def _log_model(student_dir: Path) -> str:
    """Log ``student_dir`` as the artifact of a pyfunc model in the active run; returns its URI."""
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
    return info.model_uri


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
    run = client.get_run(client.get_model_version(cfg.model_name, version).run_id)
    return {**run.data.metrics, PROTOCOL: run.data.tags.get(TAG_PROTOCOL)}
