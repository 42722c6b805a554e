"""A LoRA student in MLflow's own ``mlflow.diffusers`` flavor, beside the project's pyfunc, and
the student folder of a registered version, downloaded (for exports).

MLflow 3.17's ``mlflow.diffusers`` stores a diffusers LoRA adapter (``adapter_weights/``) with a
reference to its base model; ``mlflow.diffusers.load_model(uri).load_pipeline()`` loads the base
pipeline and applies the adapter with diffusers' ``load_lora_weights``: the student as it
trained, its adapters unfused. The registration logs it in the same run as the pyfunc model and
tags the model version with its URI (``lora_model_uri``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LORA_ARTIFACT = "student_lora"
TAG_LORA = "lora_model_uri"  # model-version tag: the mlflow.diffusers model of a LoRA student


def lora_weights(student_dir: Path) -> Path | None:
    """The LoRA folder of a LoRA student (``student.json: student.kind: lora``), else None."""
    meta = json.loads((student_dir / "student.json").read_text(encoding="utf-8"))
    entry = meta.get("student") or {}
    if entry.get("kind") != "lora":
        return None
    return student_dir / Path(entry["weights"]).parent


def log_lora_student(student_dir: Path, base_model: str | None) -> Any | None:
    """Log a LoRA student's adapter with the ``mlflow.diffusers`` flavor in the active run;
    returns its ``ModelInfo``, or None for a full student. ``base_model``: the teacher (a local
    pipeline folder, made absolute, or a hub id)."""
    import mlflow.diffusers

    adapter = lora_weights(student_dir)
    if adapter is None:
        return None
    if not base_model:
        raise ValueError(f"{student_dir} is a LoRA student: registering it with mlflow.diffusers "
                         "needs its base model (the teacher's folder or hub id)")
    local = Path(base_model).expanduser()
    reference = str(local.resolve()) if local.exists() else base_model
    return mlflow.diffusers.log_model(adapter_path=str(adapter), base_model=reference,
                                      name=LORA_ARTIFACT)


def download_student(uri: str, model_uri: str, dst: Path) -> Path:
    """The student folder of a registered model (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``) from the tracking server ``uri``, downloaded under ``dst``."""
    import mlflow

    from components.registry.store import MODEL_ARTIFACT

    before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)  # models:/ resolves through the registry of this server
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                         dst_path=str(dst)))
    except mlflow.exceptions.MlflowException as err:
        raise FileNotFoundError(f"{model_uri} not found at {uri}: {err.message}") from None
    finally:
        mlflow.set_tracking_uri(before)
    folder = local / "artifacts" / MODEL_ARTIFACT
    if not (folder / "student.json").exists():
        raise FileNotFoundError(f"{model_uri} is not a Distillery student model (no "
                                f"artifacts/{MODEL_ARTIFACT}/student.json in it)")
    return folder
