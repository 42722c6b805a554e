"""The review page in the registry: gather what the page shows from MLflow (the champion's
samples, curves, metrics and lineage), write the page, and log it with the model version. Every
MLflow call goes through ``store``'s client.

The page is logged to the version's run under ``review/review.html`` (the MLflow UI shows HTML
artifacts on the run's page) and the version's tag ``review_page`` holds its artifact URI.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.evaluation.samples import FOLDER as SAMPLES_FOLDER
from components.evaluation.samples import INDEX_FILE, read_samples
from components.io import atomic_write_text
from components.registry.gate import RegisterConfig
from components.registry.review import PAGE_FILE, Side, curves_from_csv, review_page
from components.registry.store import RegistryError, client_for, version_record

REVIEW_ARTIFACTS = "review"
TAG_REVIEW = "review_page"
EVAL_ARTIFACTS = "eval"  # the evaluate stage's folder as the register stage logs it
CURVE_FILES = ("distill_loss.csv", "distill_fid.csv")  # logged at the run's artifact root


def current_champion(uri: str, cfg: RegisterConfig) -> dict[str, Any] | None:
    """``version_record`` of the champion, or None when the model or the alias does not exist."""
    client = client_for(uri)
    try:
        version = client.get_registered_model(cfg.model_name).aliases.get(cfg.champion_alias)
    except RegistryError as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if version is None else version_record(client, cfg.model_name, str(version))


def candidate_side(uri: str, cfg: RegisterConfig, version: str, eval_dir: str | Path,
                   loss_csv: str | Path, fid_csv: str | Path) -> Side:
    """The version just registered: its metrics and tags as MLflow holds them, its samples and
    curves from the local evaluate and distill outputs."""
    record = version_record(client_for(uri), cfg.model_name, version)
    return Side(record["version"], record["metrics"], record["tags"], read_samples(eval_dir),
                curves_from_csv(loss_csv, fid_csv))


def side_of_record(uri: str, record: Mapping[str, Any], scratch: Path) -> Side:
    """A registered version as the page shows it, its samples and curves downloaded from its run
    into ``scratch`` (a version logged without them shows without them)."""
    folder = scratch / f"v{record['version']}"
    wanted = [f"{EVAL_ARTIFACTS}/{INDEX_FILE}", f"{EVAL_ARTIFACTS}/{SAMPLES_FOLDER}",
              *CURVE_FILES]
    client = client_for(uri)
    for path in wanted:
        dest = (folder / path).parent  # MLflow keeps only the last part of the path
        dest.mkdir(parents=True, exist_ok=True)
        try:
            client.download_artifacts(record["run_id"], path, str(dest))
        except (RegistryError, OSError):  # not logged by this version
            continue
    return Side(record["version"], record["metrics"], record["tags"],
                read_samples(folder / EVAL_ARTIFACTS),
                curves_from_csv(*(folder / name for name in CURVE_FILES)))


def publish_review(uri: str, cfg: RegisterConfig, registered: Mapping[str, Any],
                   candidate: Side, champion_record: Mapping[str, Any] | None,
                   out_dir: str | Path) -> dict[str, str]:
    """Write ``out_dir/review.html`` for the version ``registered`` (``register_student``'s
    result) beside ``champion_record`` (the champion it was gated against), log it to the
    version's run and tag the version; returns the page's ``path`` and ``artifact_uri``."""
    with tempfile.TemporaryDirectory() as scratch:
        champion = (None if champion_record is None
                    else side_of_record(uri, champion_record, Path(scratch)))
        page = review_page(cfg.model_name, candidate, champion, bool(registered["promoted"]),
                           str(registered["reason"]), cfg.noise_multiple)
    path = Path(out_dir) / PAGE_FILE
    atomic_write_text(path, page)
    client = client_for(uri)
    client.log_artifact(registered["run_id"], str(path), REVIEW_ARTIFACTS)
    run = client.get_run(registered["run_id"])
    artifact_uri = f"{run.info.artifact_uri.rstrip('/')}/{REVIEW_ARTIFACTS}/{PAGE_FILE}"
    client.set_model_version_tag(cfg.model_name, registered["version"], TAG_REVIEW, artifact_uri)
    client.set_tag(registered["run_id"], TAG_REVIEW, artifact_uri)
    return {"path": str(path), "artifact_uri": artifact_uri}


def review_location(record: Mapping[str, Any]) -> str | None:
    """Where a version's review page is: a local file path when the artifact store is local,
    else its artifact URI; None when the version has none."""
    uri = record.get("tags", {}).get(TAG_REVIEW)
    if not uri:
        return None
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(uri).path)
    return uri
