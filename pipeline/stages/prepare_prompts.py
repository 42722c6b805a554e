"""Stage prepare_prompts: training prompts and evaluation captions, with a content hash."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from components.io import atomic_dir, write_json
from components.prompts import PromptSourceError, prepare, read_source, select_eval
from pipeline import paths
from pipeline.params import load_stage, undeclared_sources
from pipeline.stages.common import entry, log, write_resolved


def _check_declared(root: Path, cfg) -> None:
    """Every prompt file must be a dvc.yaml dependency of this stage, else editing it would
    leave the prompts stale while `dvc status` says up to date."""
    errors = undeclared_sources(root, cfg)
    if errors:
        raise PromptSourceError(errors[0])


def run(root: Path) -> None:
    cfg = load_stage(root, "prepare_prompts")["prompts"]
    _check_declared(root, cfg)
    train = [c.caption for src in cfg.train_sources for c in read_source(src, root)]
    evals = select_eval(read_source(cfg.eval_source, root), cfg)
    kept, evals, manifest = prepare(train, evals, cfg)
    with atomic_dir(root / paths.PROMPTS) as out:
        (out / paths.TRAIN_PROMPTS.name).write_text("\n".join(kept) + "\n", encoding="utf-8")
        (out / paths.EVAL_CAPTIONS.name).write_text(
            json.dumps([asdict(c) for c in evals], indent=1) + "\n", encoding="utf-8")
        write_json(out / paths.PROMPTS_MANIFEST.name, manifest)
        write_resolved(out / "resolved_config.json", prompts=cfg)
    log(f"prepare_prompts: {manifest['train_count']} training prompts, "
        f"{manifest['eval_count']} evaluation captions "
        f"({manifest['removed_eval_overlap']} evaluation captions removed from training)")


def main() -> None:
    entry(run, "prepare_prompts")


if __name__ == "__main__":
    main()
