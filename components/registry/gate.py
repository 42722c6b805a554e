"""The promotion gate: a pure rule deciding whether a candidate student replaces the champion.

No MLflow here, so params loading and tests of the rule stay light.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PROTOCOL = "protocol"  # key of the eval protocol in the records ``should_promote`` compares
TAG_PROTOCOL = "eval_protocol"
# Eval-card fields that decide whether two FID / CLIP numbers are comparable. Left out on
# purpose: what is evaluated (steps, guidance), where (device) and library versions.
PROTOCOL_FIELDS = ("protocol", "caption_list_sha256", "n_images", "reference_sha256",
                   "reference_stats_key", "resize", "feature_network", "feature_weights_sha256",
                   "clip_model", "clip_weights", "clip_prefix", "base_seed", "seeds", "precision",
                   "card_version")


@dataclass(frozen=True)
class RegisterConfig:
    """The ``register`` params section.

    A candidate becomes champion when its FID is lower than the champion's by at least the margin
    and its CLIP score is not lower by more than the tolerance. The margin is ``fid_margin`` or
    ``noise_multiple`` standard errors of the FID difference, whichever is larger (the standard
    errors are the evaluate stage's ``fid_std``), so a gain inside the noise never promotes; a
    CLIP drop inside ``noise_multiple`` standard errors is likewise not counted as a drop.
    A student evaluated on part of a protocol (fewer images, a smaller reference set) is a proxy
    and never promoted unless ``allow_incomplete``.
    """

    model_name: str
    experiment: str
    fid_margin: float
    clip_tolerance: float
    noise_multiple: float = 2.0
    allow_incomplete: bool = False  # gate students evaluated on part of a protocol too
    fid_metric: str = "fid"
    clip_metric: str = "clip_score"
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"

    def validate(self) -> None:
        if not self.model_name or not self.experiment:
            raise ValueError("model_name and experiment must not be empty")
        if not (self.fid_margin >= 0 and self.clip_tolerance >= 0):
            raise ValueError("fid_margin and clip_tolerance must be >= 0 (and not NaN)")
        if not self.noise_multiple >= 1:
            raise ValueError("noise_multiple must be >= 1: the margin may not be below the "
                             "measured noise")
        if self.candidate_alias == self.champion_alias:
            raise ValueError("candidate_alias and champion_alias must differ")


def protocol_id(card: Mapping[str, Any]) -> str:
    """``<protocol>-<12 hex>``: the protocol's name and a hash of the card's comparability fields.

    Two students are compared only when their ids are equal: same captions, seeds, reference set,
    feature network and CLIP scorer. A card lacking one of ``PROTOCOL_FIELDS`` is an error.
    """
    missing = [k for k in PROTOCOL_FIELDS if k not in card]
    if missing:
        raise ValueError(f"eval card lacks {', '.join(missing)}; re-run the evaluate stage")
    fields = {k: card[k] for k in PROTOCOL_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"{card['protocol']}-{'' if is_complete(card) else PARTIAL}{digest[:12]}"


PARTIAL = "partial-"  # in the protocol id of a card that covers part of its protocol


def is_complete(card: Mapping[str, Any]) -> bool:
    """Whether ``card`` covers its whole protocol: every image, and the full reference set."""
    from components.evaluation.protocols import PROTOCOLS

    protocol = PROTOCOLS.get(card["protocol"])
    full_reference = (protocol is None or protocol.reference_size is None
                      or card.get("n_reference") == protocol.reference_size)
    return card.get("complete", True) is not False and full_reference


@dataclass(frozen=True)
class Lineage:
    """Where a student came from; written as tags on the run and on the model version."""

    git_commit: str
    method: str
    teacher: str
    params_hash: str
    eval_protocol: str

    def tags(self) -> dict[str, str]:
        tags = {k: str(v) for k, v in asdict(self).items()}
        tags[TAG_PROTOCOL] = tags.pop("eval_protocol")
        return tags


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def should_promote(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None,
                   rule: RegisterConfig) -> Decision:
    """Decide whether ``candidate`` replaces ``champion``; both map metric names (and their
    ``<metric>_std``) and ``protocol``.

    Metrics are only comparable under the same eval protocol, so a protocol mismatch never
    promotes; nor does a partial protocol (``is_complete``) unless ``rule.allow_incomplete``.
    Equal FIDs do not promote (no improvement); a CLIP drop of exactly the tolerance is
    allowed. A missing or non-finite metric on either side blocks promotion, and so does an FID
    whose noise neither side measured (the margin could not be held above it).
    """
    ours, theirs = candidate.get(PROTOCOL), champion and champion.get(PROTOCOL)
    if PARTIAL in str(ours) and not rule.allow_incomplete:
        return Decision(False, f"evaluated on part of its protocol ({ours}): a proxy, not "
                               "promoted; evaluate on the whole protocol, or set "
                               "register.allow_incomplete: true")
    if champion is None:
        return Decision(True, "no champion yet")
    if not ours or not theirs or ours != theirs:
        return Decision(False, f"eval protocols differ (candidate {ours!r}, champion {theirs!r}); "
                               "metrics are not comparable, re-evaluate the champion first")
    for side, record in (("candidate", candidate), ("champion", champion)):
        for key in (rule.fid_metric, rule.clip_metric):
            if _finite(record.get(key)) is None:
                return Decision(False, f"{side} has no finite {key!r} "
                                       f"(got {record.get(key)!r}); cannot compare")
    fid_margin, fid_why = _margin(candidate, champion, rule.fid_metric, rule.fid_margin, rule)
    if fid_margin is None:
        return Decision(False, f"{fid_why}; re-run the evaluate stage of the version without it")
    clip_tolerance, clip_why = _margin(candidate, champion, rule.clip_metric,
                                       rule.clip_tolerance, rule)
    if clip_tolerance is None:  # unmeasured CLIP noise widens nothing
        clip_tolerance, clip_why = rule.clip_tolerance, f"tolerance {rule.clip_tolerance:g}"
    fid_gain = champion[rule.fid_metric] - candidate[rule.fid_metric]
    clip_drop = champion[rule.clip_metric] - candidate[rule.clip_metric]
    summary = ", ".join(f"{m} {_pm(candidate, m)} vs {_pm(champion, m)}"
                        for m in (rule.fid_metric, rule.clip_metric))
    if not (fid_gain > 0 and fid_gain >= fid_margin):
        return Decision(False, f"{rule.fid_metric} not lower by at least {fid_margin:.3g} "
                               f"({fid_why}; {summary})")
    if clip_drop > clip_tolerance:
        return Decision(False, f"{rule.clip_metric} dropped by more than {clip_tolerance:.3g} "
                               f"({clip_why}; {summary})")
    return Decision(True, f"better than the champion ({summary})")


def noise_of_difference(candidate: Mapping[str, Any], champion: Mapping[str, Any],
                        metric: str) -> float | None:
    """Standard error of ``candidate[metric] - champion[metric]`` from their ``<metric>_std``;
    a side without one is taken to be as noisy as the other; None when neither has one."""
    stds = [_finite(record.get(f"{metric}_std")) for record in (candidate, champion)]
    known = [s for s in stds if s is not None and s >= 0]
    if not known:
        return None
    a, b = (s if s is not None and s >= 0 else known[0] for s in stds)
    return math.hypot(a, b)


def _margin(candidate: Mapping[str, Any], champion: Mapping[str, Any], metric: str,
            configured: float, rule: RegisterConfig) -> tuple[float | None, str]:
    """The margin in force, ``max(configured, noise_multiple x noise)``, and why."""
    noise = noise_of_difference(candidate, champion, metric)
    if noise is None:
        return None, f"the noise of {metric!r} is not measured ({metric}_std missing)"
    margin = max(configured, rule.noise_multiple * noise)
    return margin, (f"margin max({configured:g}, {rule.noise_multiple:g} x noise {noise:.3g})")


def _pm(record: Mapping[str, Any], metric: str) -> str:
    value, std = _finite(record.get(metric)), _finite(record.get(f"{metric}_std"))
    return f"{value:.4g}" + ("" if std is None else f" ± {std:.2g}")


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
