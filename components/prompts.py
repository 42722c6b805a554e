"""Prompt set preparation: read prompts from configured sources, normalize, deduplicate, keep
evaluation captions out of the training prompts, and describe the result with a content hash.

Sources are COCO caption files (the miniature world's splits use the same format) or plain text
files with one prompt a line. Pure functions; file reading happens in ``read_source`` only.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from components.io import sha256_bytes


class PromptSourceError(ValueError):
    """A prompt source is missing, empty or unreadable; the message says how to fix it."""


@dataclass(frozen=True)
class PromptSource:
    """One prompt file: ``coco`` (a COCO captions JSON) or ``text`` (UTF-8, one prompt a line)."""

    kind: Literal["coco", "text"]
    path: str


@dataclass(frozen=True)
class PromptsConfig:
    """``params.yaml: prompts``."""

    train_sources: tuple[PromptSource, ...]
    eval_source: PromptSource
    max_train: int | None = None
    max_eval: int = 500
    one_caption_per_image: bool = True
    seed: int = 0

    def validate(self) -> None:
        if not self.train_sources:
            raise ValueError("train_sources is empty; list at least one prompt file")
        if self.max_eval < 1:
            raise ValueError("max_eval must be at least 1")


@dataclass(frozen=True)
class EvalCaption:
    """One evaluation caption with the COCO ids it came from."""

    caption: str
    image_id: int
    annotation_id: int


def normalize(prompt: str) -> str:
    """NFC unicode, single spaces, no surrounding whitespace or trailing period."""
    text = unicodedata.normalize("NFC", prompt)
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(".").strip()


def _key(prompt: str) -> str:
    return normalize(prompt).lower()


def read_text_prompts(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise PromptSourceError(
            f"{path} is not valid UTF-8 (byte {err.start}): re-encode it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed.txt`") from None
    return [line for line in text.splitlines() if line.strip()]


def read_coco_captions(path: Path) -> list[EvalCaption]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PromptSourceError(f"{path} is not a readable COCO captions JSON: {err}") from None
    if not isinstance(data, dict) or "annotations" not in data:
        raise PromptSourceError(f"{path} has no 'annotations' list; expected COCO caption format "
                                "({'images': [...], 'annotations': [{'image_id', 'caption'}]})")
    return [EvalCaption(a["caption"], int(a["image_id"]), int(a["id"]))
            for a in data["annotations"]]


def source_path(source: PromptSource, root: Path) -> Path:
    """Where ``source`` is: its path, relative to the project ``root`` unless absolute."""
    return Path(source.path) if Path(source.path).is_absolute() else root / source.path


def read_source(source: PromptSource, root: Path) -> list[EvalCaption]:
    """Read one source as captions (text prompts get running ids); errors say what to fix."""
    path = source_path(source, root)
    if not path.is_file():
        raise PromptSourceError(f"prompt source {source.path!r} not found (looked in {path}); "
                                "fix the path in params.yaml or build it first")
    if source.kind == "text":
        items = [EvalCaption(p, i, i) for i, p in enumerate(read_text_prompts(path))]
    else:
        items = read_coco_captions(path)
    if not any(normalize(i.caption) for i in items):
        raise PromptSourceError(f"prompt source {source.path!r} is empty; it needs at least one "
                                "non-blank prompt")
    return items


def dedupe(prompts: Sequence[str]) -> list[str]:
    """Normalized prompts, first occurrence kept, case-insensitive, blanks dropped."""
    seen: set[str] = set()
    out = []
    for p in prompts:
        norm, key = normalize(p), _key(p)
        if norm and key not in seen:
            seen.add(key)
            out.append(norm)
    return out


def select_eval(captions: Sequence[EvalCaption], cfg: PromptsConfig) -> list[EvalCaption]:
    """Evaluation captions: one per image if asked (the first), sorted by image id, capped."""
    chosen: dict[int, EvalCaption] = {}
    rows = []
    for c in sorted(captions, key=lambda c: (c.image_id, c.annotation_id)):
        if not normalize(c.caption):
            continue
        if cfg.one_caption_per_image:
            if c.image_id in chosen:
                continue
            chosen[c.image_id] = c
        rows.append(EvalCaption(normalize(c.caption), c.image_id, c.annotation_id))
    return rows[: cfg.max_eval]


def prepare(train: Sequence[str], evals: Sequence[EvalCaption],
            cfg: PromptsConfig) -> tuple[list[str], list[EvalCaption], dict]:
    """Training prompts without any evaluation caption, shuffled with the seed, and a manifest."""
    eval_keys = {_key(c.caption) for c in evals}
    unique = dedupe(train)
    kept = [p for p in unique if _key(p) not in eval_keys]
    random.Random(cfg.seed).shuffle(kept)
    if cfg.max_train is not None:
        kept = kept[: cfg.max_train]
    if not kept:
        raise PromptSourceError("no training prompts left after removing evaluation captions; "
                                "add training sources that differ from the evaluation captions")
    manifest = {
        "train_count": len(kept),
        "eval_count": len(evals),
        "removed_duplicates": len(train) - len(unique),
        "removed_eval_overlap": len(unique) - len([p for p in unique if _key(p) not in eval_keys]),
        "train_sha256": sha256_bytes("\n".join(kept).encode()),
        "eval_sha256": sha256_bytes("\n".join(c.caption for c in evals).encode()),
    }
    return kept, evals, manifest
