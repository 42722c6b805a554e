"""Stage register: log the run to MLflow, register the student with its model card, alias it
``candidate`` and promote it to ``champion`` only if the promotion gate says it beats the current
champion under the same eval protocol (the protocol's name plus a hash of its eval card)."""

from __future__ import annotations

import json
from pathlib import Path

from components.io import read_json, sha256_bytes, sha256_file, sha256_tree, write_json
from components.registry.card import GRID_FILE, model_card
from components.registry.gate import Lineage, protocol_id
from components.registry.review_store import candidate_side, current_champion, publish_review
from components.registry.store import (
    artifact_location,
    register_student,
    tag_lineage,
    tracking_uri,
)
from pipeline import paths
from pipeline.lineage import git_commit
from pipeline.params import PARAMS_FILE, load_stage, read_params
from pipeline.stages.common import entry, log, require


def run(root: Path) -> None:
    cfg = load_stage(root, "register")["register"]
    evaluation = read_json(require(root / paths.EVAL_METRICS, "evaluate"))
    cards = read_json(require(root / paths.EVAL_OUT / "eval_card.json", "evaluate"))
    student_meta = read_json(require(root / paths.STUDENT / "student.json", "distill"))
    lineage = Lineage(git_commit=git_commit(root), method=student_meta["method"],
                      teacher=student_meta["teacher"],
                      params_hash=sha256_file(root / PARAMS_FILE)[:16],
                      eval_protocol=protocol_id(cards["student"]["card"]))
    metrics = {**evaluation["student"], "teacher": evaluation["teacher"],
               "teacher_1step": evaluation["teacher_1step"],
               "distill": read_json(root / paths.DISTILL_METRICS)}
    uri = tracking_uri(root)
    artifacts = [root / paths.EVAL_OUT, root / paths.DISTILL_OUT, root / PARAMS_FILE]
    artifacts += [p for p in (root / "dvc.lock", root / paths.LOSS_PLOT,
                              root / paths.PROXY_FID_PLOT) if p.exists()]
    grid = root / paths.EVAL_OUT / GRID_FILE
    training = training_facts(root, student_meta)
    card = model_card(cfg.model_name, lineage, evaluation, cards, extra=training,
                      grid=GRID_FILE if grid.exists() else None)
    champion = current_champion(uri, cfg)  # the one the gate compares against
    result = register_student(cfg, root / paths.STUDENT, metrics, lineage, uri=uri,
                              artifact_root=artifact_location(root, uri),
                              params=read_params(root), artifacts=artifacts, model_card=card,
                              card_files=[grid] if grid.exists() else [],
                              identity=identity(root / paths.STUDENT, cards["student"]["card"]),
                              base_model=base_model(root, student_meta))
    if training:  # on the run and its version: a reviewer sees them without opening the card
        tag_lineage(uri, result["run_id"], {k.replace(" ", "_"): v for k, v in training.items()},
                    cfg.model_name, result["version"])
    candidate = candidate_side(uri, cfg, result["version"], root / paths.EVAL_OUT,
                               root / paths.LOSS_PLOT, root / paths.PROXY_FID_PLOT)
    review = publish_review(uri, cfg, result, candidate, champion, root / paths.REVIEW_OUT)
    result["review_page"] = review["path"]
    result["review_artifact"] = review["artifact_uri"]
    write_json(root / paths.REGISTER_OUT, result)
    log(f"register: review page {review['path']} (MLflow: {review['artifact_uri']})")
    verdict = "promoted to champion" if result["promoted"] else "not promoted"
    same = " (the same student and eval card as before: reused)" if result["reused"] else ""
    log(f"register: {cfg.model_name} version {result['version']}{same} is candidate; {verdict} "
        f"({result['reason']})")


def training_facts(root: Path, student_meta: dict) -> dict[str, str]:
    """What the distill stage says about its own run: the training monitor's flags (none, or
    how many and the first) and which weights were saved (last step, or best proxy FID)."""
    facts = {}
    monitor = root / paths.DISTILL_OUT / paths.MONITOR_FILE
    if monitor.exists():
        flags = read_json(monitor)["flags"]
        facts["training monitor"] = ("no flags" if not flags else
                                     f"{len(flags)} flag(s); first at step {flags[0]['step']}: "
                                     f"{flags[0]['reason']}")
    saved = student_meta.get("saved")
    if saved:
        facts["saved weights"] = (f"step {saved['step']}" + (
            f" (lowest proxy FID {saved['proxy_fid']:.2f})" if saved["which"] == "best"
            else " (last)"))
    return facts


def base_model(root: Path, student_meta: dict) -> str | None:
    """The teacher a LoRA student's adapter applies to (its folder, absolute, or its hub id);
    None for a full student."""
    if (student_meta.get("student") or {}).get("kind") != "lora":
        return None
    teacher = student_meta["teacher"]
    local = root / teacher
    return str(local.resolve()) if local.exists() else teacher


def identity(student: Path, card: dict) -> dict[str, str]:
    """What makes two registrations the same: the student folder's content hash and its eval
    card's, the measured latency left out (it varies from run to run)."""
    settings = {k: v for k, v in card.items() if k != "latency"}
    return {"student_sha256": sha256_tree(student),
            "eval_card_sha256": sha256_bytes(json.dumps(settings, sort_keys=True).encode())}


def main() -> None:
    entry(run, "register")


if __name__ == "__main__":
    main()
