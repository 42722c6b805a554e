"""The morning review: the registry's models, the new candidate next to the champion, promotion.

    uv run python -m pipeline.registry_cli list                # models, versions, aliases
    uv run python -m pipeline.registry_cli compare             # candidate | champion, gate verdict,
                                                               # where the review page is
    uv run python -m pipeline.registry_cli promote             # candidate → champion if the gate agrees
    uv run python -m pipeline.registry_cli promote --version 3 --force   # overrule the gate
    uv run python -m pipeline.registry_cli show --version 3 [--tag dvc_exp_rev]   # one version

The model name, aliases and gate margins come from ``params.yaml`` (``register``); the store is
``MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db`` (``--tracking-uri`` overrides both).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from components.config import ConfigError, from_dict
from components.registry.gate import TAG_PROTOCOL, RegisterConfig, should_promote
from pipeline import env
from pipeline.lineage import TAG_EXPERIMENT, TAG_EXPERIMENT_REV

# (label, where in a version record, format) of the side-by-side rows
ROWS = (("version", ("version",), "{}"), ("aliases", ("aliases",), "{}"),
        ("FID ↓", ("metrics", "fid"), "± {:.3f}"),
        ("CLIP score ↑", ("metrics", "clip_score"), "± {:.4f}"),
        ("latency, batch 1 (s)", ("metrics", "latency_s"), "{:.4f}"),
        ("teacher FID", ("metrics", "teacher.fid"), "± {:.3f}"),
        ("teacher CLIP score", ("metrics", "teacher.clip_score"), "± {:.4f}"),
        ("distillation steps", ("params", "distill.loop.steps"), "{}"),
        ("method", ("tags", "method"), "{}"), ("teacher", ("tags", "teacher"), "{}"),
        ("eval protocol", ("tags", TAG_PROTOCOL), "{}"),
        ("params hash", ("tags", "params_hash"), "{}"),
        ("git commit", ("tags", "git_commit"), "{}"),
        ("DVC experiment", ("tags", TAG_EXPERIMENT), "{}"),
        ("DVC experiment rev", ("tags", TAG_EXPERIMENT_REV), "{}"),
        ("MLflow run", ("run_id",), "{}"), ("registered", ("created_ms",), "time"),
        ("gate at registration", ("tags", "promotion"), "{}"))


def register_config(root: Path, model: str | None) -> RegisterConfig:
    """The ``register`` section of ``root/params.yaml`` (``model`` replaces its model name)."""
    path = root / "params.yaml"
    section: dict[str, Any] = {}
    if path.exists():
        section = dict((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
            "register") or {})
    if model:
        section["model_name"] = model
    if "model_name" not in section:
        raise ConfigError(f"no model name: pass --model or run from a project root ({path} "
                          "has no register.model_name)")
    section.setdefault("experiment", "distillery")
    section.setdefault("fid_margin", 0.0)
    section.setdefault("clip_tolerance", 0.0)
    return from_dict(RegisterConfig, section, "register")


def _cell(record: dict[str, Any] | None, where: tuple[str, ...], fmt: str) -> str:
    if record is None:
        return "—"
    value: Any = record
    for key in where:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return "—"
    if fmt == "time":
        return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if isinstance(value, list):
        return ", ".join(value) or "—"
    if fmt.startswith("± "):  # a metric, with its standard error when it was measured
        std = record["metrics"].get(f"{where[-1]}_std")
        text = fmt[2:].format(value)
        return text if std is None else f"{text} ± {fmt[2:].format(std)}"
    return fmt.format(value) if isinstance(value, (int, float)) else str(value)


def side_by_side(cfg: RegisterConfig, candidate: dict | None, champion: dict | None) -> str:
    """Markdown: the candidate and champion versions row by row, then the gate's verdict."""
    lines = [f"# {cfg.model_name}", "",
             f"| | {cfg.candidate_alias} | {cfg.champion_alias} |", "| --- | --- | --- |"]
    lines += [f"| {label} | {_cell(candidate, where, fmt)} | {_cell(champion, where, fmt)} |"
              for label, where, fmt in ROWS]
    if candidate and candidate.get("run_url"):
        lines.append(f"\ncandidate run: {candidate['run_url']}")
    k = f"{cfg.noise_multiple:g} x noise"
    rule = (f"FID lower by ≥ max({cfg.fid_margin:g}, {k}), CLIP score lower by ≤ "
            f"max({cfg.clip_tolerance:g}, {k}), same protocol")
    lines += ["", f"gate ({rule}): {verdict(cfg, candidate, champion)}"]
    if candidate is not None:
        from components.registry.review_store import review_location

        where = review_location(candidate)
        lines.append(f"review page: {where}" if where else
                     f"review page: none (version {candidate['version']} was registered "
                     "without one; re-run `dvc repro register`)")
    return "\n".join(lines) + "\n"


def verdict(cfg: RegisterConfig, candidate: dict | None, champion: dict | None) -> str:
    from components.registry.store import gate_record

    if candidate is None:
        return f"no version holds the alias {cfg.candidate_alias!r}"
    if champion is not None and champion["version"] == candidate["version"]:
        return "the candidate is the champion"
    decision = should_promote(gate_record(candidate),
                              None if champion is None else gate_record(champion), cfg)
    return ("promote" if decision.promote else "keep the champion") + f": {decision.reason}"


def show(uri: str, cfg: RegisterConfig, version: str, tag: str | None) -> str:
    """One version as a table, or with ``tag`` only that tag's value (for scripts)."""
    from components.registry.store import client_for, version_record

    record = version_record(client_for(uri), cfg.model_name, version)
    if tag is not None:
        if tag not in record["tags"]:
            raise SystemExit(f"show: version {version} has no tag {tag!r}; it has: "
                             f"{', '.join(sorted(record['tags']))}")
        return record["tags"][tag] + "\n"
    lines = [f"# {cfg.model_name} version {version}", "", "| | |", "| --- | --- |"]
    lines += [f"| {label} | {_cell(record, where, fmt)} |" for label, where, fmt in ROWS]
    return "\n".join(lines) + "\n"


def list_models(uri: str) -> str:
    from components.registry.store import registry_overview

    lines = ["| model | teacher | versions | aliases |", "| --- | --- | --- | --- |"]
    for m in registry_overview(uri):
        aliases = ", ".join(f"{a} → {v}" for a, v in m["aliases"].items()) or "—"
        lines.append(f"| {m['name']} | {m['teacher'] or '—'} | {', '.join(m['versions'])} | "
                     f"{aliases} |")
    return "\n".join(lines) + "\n"


def promote(uri: str, cfg: RegisterConfig, version: str | None, force: bool) -> str:
    """Move the champion alias to ``version`` (default: the candidate) if the gate agrees or
    ``force``; returns what happened, raises ``SystemExit`` when the gate refuses."""
    from components.registry.store import alias_record, client_for, set_alias, version_record

    champion = alias_record(uri, cfg.model_name, cfg.champion_alias)
    if version is None:
        chosen = alias_record(uri, cfg.model_name, cfg.candidate_alias)
        if chosen is None:
            raise SystemExit(f"promote: {cfg.model_name} has no {cfg.candidate_alias!r} version")
    else:
        chosen = version_record(client_for(uri), cfg.model_name, version)
    if champion is not None and champion["version"] == chosen["version"]:
        return f"{cfg.model_name} version {chosen['version']} is already {cfg.champion_alias}\n"
    text = verdict(cfg, chosen, champion)
    if not text.startswith("promote") and not force:
        raise SystemExit(f"promote: version {chosen['version']} not promoted ({text}); "
                         "add --force to promote it anyway")
    how = "by hand" if text.startswith("promote") else "by hand, overruling the gate"
    set_alias(uri, cfg.model_name, cfg.champion_alias, chosen["version"],
              f"promoted {how}: {text}")
    return (f"{cfg.model_name} version {chosen['version']} is now {cfg.champion_alias} "
            f"(was {champion['version'] if champion else 'none'}); {text}\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.registry_cli")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI")
    parser.add_argument("--model", help="registered model (default: register.model_name)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models, their versions and aliases")
    sub.add_parser("compare", help="candidate and champion side by side, with the gate verdict")
    prom = sub.add_parser("promote", help="make a version (default: the candidate) champion")
    prom.add_argument("--version", help="model version (default: the candidate)")
    prom.add_argument("--force", action="store_true", help="promote even if the gate says no")
    one = sub.add_parser("show", help="one version: metrics, lineage tags")
    one.add_argument("--version", required=True, help="model version")
    one.add_argument("--tag", help="print only this tag's value (e.g. dvc_exp_rev)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    env.configure(root)
    from components.registry.store import RegistryError, alias_record, tracking_uri

    uri = args.tracking_uri or tracking_uri(root)
    try:
        if args.command == "list":
            out = list_models(uri)
        else:
            cfg = register_config(root, args.model)
            if args.command == "compare":
                out = side_by_side(cfg, alias_record(uri, cfg.model_name, cfg.candidate_alias),
                                   alias_record(uri, cfg.model_name, cfg.champion_alias))
            elif args.command == "show":
                out = show(uri, cfg, args.version, args.tag)
            else:
                out = promote(uri, cfg, args.version, args.force)
    except (ConfigError, RegistryError) as err:  # bad params; unknown model/version, no server
        raise SystemExit(f"registry: {err}") from None
    sys.stdout.write(out)


if __name__ == "__main__":
    main()
