"""The model card of a registered student: one markdown page a reviewer reads before promoting.

It holds the lineage (method, teacher, commit, params hash, eval protocol), the metrics of the
student next to its teacher under one protocol, the sample grid, and the eval card behind the
numbers. Pure text; ``store`` logs it next to the grid and sets it as the version's description.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from components.registry.gate import Lineage

CARD_FILE = "model_card.md"
GRID_FILE = "grid.png"
ROW_LABELS = {"student": "distilled student", "teacher": "teacher",
              "teacher_1step": "teacher at 1 step (the untrained student)"}


def model_card(model_name: str, lineage: Lineage, evaluation: Mapping[str, Any],
               eval_cards: Mapping[str, Any], extra: Mapping[str, str] | None = None,
               grid: str | None = GRID_FILE) -> str:
    """Markdown model card.

    ``evaluation`` is the evaluate stage's metrics (``protocol`` plus one row per model with
    ``fid``, ``clip_score``, ``latency_s``, ``steps``), ``eval_cards`` its eval cards
    (``{model: {"card": {...}}}``), ``extra`` further lineage lines (e.g. the DVC experiment).
    """
    lines = [f"# {model_name}: one-step student distilled with {lineage.method}", ""]
    lines += ["| lineage | |", "| --- | --- |"]
    facts = {"method": lineage.method, "teacher": lineage.teacher,
             "git commit": lineage.git_commit, "params hash": lineage.params_hash,
             "eval protocol": lineage.eval_protocol, **(extra or {})}
    lines += [f"| {key} | `{value}` |" for key, value in facts.items()]
    lines += ["", f"## Metrics (protocol `{lineage.eval_protocol}`)", "", *metrics_table(evaluation)]
    if grid:
        lines += ["", "## Samples", "",
                  f"![rows: {', '.join(_rows(evaluation))}, same captions and seeds]({grid})"]
    student_card = (eval_cards.get("student") or {}).get("card")
    if student_card:
        lines += ["", "## Eval card (student)", "", *eval_card_table(student_card)]
    return "\n".join(lines) + "\n"


def metrics_table(evaluation: Mapping[str, Any]) -> list[str]:
    """Rows of FID, CLIP score and latency per model, the student first."""
    out = ["| model | steps | guidance scale | FID ↓ ± s.e. | CLIP score ↑ ± s.e. | latency, batch 1 |",
           "| --- | --- | --- | --- | --- | --- |"]
    for name in _rows(evaluation):
        row = evaluation[name]
        guidance = row.get("guidance_scale")
        out.append(f"| {ROW_LABELS.get(name, name)} | {row.get('steps', '')} | "
                   f"{'' if guidance in (None, 1.0) else f'{guidance:g}'} | "
                   f"{_pm(row, 'fid', '.2f')} | {_pm(row, 'clip_score', '.4f')} | "
                   f"{_num(_ms(row.get('latency_s')), '.1f')} ms |")
    return out


def eval_card_table(card: Mapping[str, Any]) -> list[str]:
    """The eval card as a two-column table; library versions on one line."""
    out = ["| setting | value |", "| --- | --- |"]
    for key, value in card.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif not isinstance(value, str):
            value = json.dumps(value)
        out.append(f"| {key} | {value} |")
    return out


def _rows(evaluation: Mapping[str, Any]) -> list[str]:
    names = [k for k, v in evaluation.items() if isinstance(v, Mapping)]
    return sorted(names, key=lambda n: (n != "student", n))


def _ms(seconds: Any) -> float | None:
    return None if not isinstance(seconds, (int, float)) else seconds * 1000


def _pm(row: Mapping[str, Any], key: str, fmt: str) -> str:
    std = row.get(f"{key}_std")
    return _num(row.get(key), fmt) + ("" if std is None else f" ± {_num(std, fmt)}")


def _num(value: Any, fmt: str) -> str:
    return "n/a" if not isinstance(value, (int, float)) else format(value, fmt)
