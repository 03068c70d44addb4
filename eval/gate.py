"""Gating a CI job on a run's metrics, and comparing two runs.

Every gateable metric has a flat name (``gate_metrics`` builds them from a report):
- retrieval, per mode: ``retrieval.<mode>.<metric>`` with mode ``dense``, ``bm25``, ``hybrid``, ``hybrid+rerank`` and
  metric ``recall@1``, ``recall@5``, ``recall@10``, ``mrr``, ``ndcg@5``, ``ndcg@10`` (``@5`` is ``@k``);
- generation: ``rag.<metric>`` (``accuracy``, ``token_f1``, ``faithfulness``, ``hallucination_rate``,
  ``citation_precision``, ``citation_recall``, ``unsupported_sentence_rate``, ``abstention_rate``), with
  ``--baseline`` also ``baseline.<metric>`` (``accuracy``, ``token_f1``, ``faithfulness``, ``hallucination_rate``),
  with ``--unanswerable`` ``unanswerable.abstention_rate``;
- generated images (``--images``): ``images.clip_score``, ``images.clip_i``, ``images.gold_reference_rate``;
- the support scorer as a detector (``--detector``): ``detector.<form>.<metric>`` with form ``raw`` or ``sentence``
  and metric ``auroc``, ``f1``, ``best_f1``.

``--fail-under METRIC=VALUE`` fails the run when the metric is below VALUE; ``--fail-over METRIC=VALUE`` when it is
above (for rates where lower is better: hallucination, abstention). A metric the run did not measure (a skipped mode,
no citation at all) fails its threshold too. A failed gate exits with ``EXIT_GATE_FAILED`` (9), distinct from the
error exit codes (1, 3-8).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrag.errors import BadInputError

__all__ = ["EXIT_GATE_FAILED", "Threshold", "check_gates", "compare_reports", "gate_metrics", "load_report",
           "metric_names", "parse_thresholds"]

EXIT_GATE_FAILED = 9
RETRIEVAL_MODES = ("dense", "bm25", "hybrid", "hybrid+rerank")
RETRIEVAL_METRICS = ("recall@1", "recall@{k}", "recall@10", "mrr", "ndcg@{k}", "ndcg@10")
RAG_METRICS = ("accuracy", "token_f1", "faithfulness", "hallucination_rate", "citation_precision", "citation_recall",
               "unsupported_sentence_rate", "abstention_rate")
BASELINE_METRICS = ("accuracy", "token_f1", "faithfulness", "hallucination_rate")
DETECTOR_METRICS = ("auroc", "f1", "best_f1")
DETECTOR_FORMS = ("raw", "sentence")
IMAGE_METRICS = ("clip_score", "clip_i", "gold_reference_rate")


@dataclass(frozen=True)
class Threshold:
    metric: str
    value: float
    direction: str  # "under": fail when below; "over": fail when above

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.direction == 'under' else '<='} {self.value:g}"


def metric_names(*, retrieval: bool = True, generation: bool = False, baseline: bool = False,
                 unanswerable: bool = False, detector: bool = False, images: bool = False, k: int = 5) -> list[str]:
    """The gateable metric names a run with these options produces."""
    names: list[str] = []
    if retrieval:
        for mode in RETRIEVAL_MODES:
            names += [f"retrieval.{mode}.{m.format(k=k)}" for m in dict.fromkeys(RETRIEVAL_METRICS)]
    if generation:
        names += [f"rag.{m}" for m in RAG_METRICS]
        if baseline:
            names += [f"baseline.{m}" for m in BASELINE_METRICS]
        if unanswerable:
            names.append("unanswerable.abstention_rate")
    if images:
        names += [f"images.{m}" for m in IMAGE_METRICS]
    if detector:
        names += [f"detector.{form}.{m}" for form in DETECTOR_FORMS for m in DETECTOR_METRICS]
    return list(dict.fromkeys(names))


def parse_thresholds(specs: Sequence[str], direction: str, valid: Sequence[str]) -> list[Threshold]:
    """``METRIC=VALUE`` strings as thresholds; a malformed one or an unknown metric is a ``BadInputError`` that
    lists the valid names."""
    option = f"--fail-{direction}"
    thresholds = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise BadInputError(f"{option} {spec!r}: expected METRIC=VALUE, e.g. {option} rag.accuracy=0.25")
        try:
            value = float(raw)
        except ValueError:
            raise BadInputError(f"{option} {spec!r}: {raw.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise BadInputError(f"{option} {spec!r}: the value must be a finite number")
        if name not in valid:
            raise BadInputError(f"{option}: unknown metric {name!r} for this run; valid metrics: {', '.join(valid)}")
        thresholds.append(Threshold(name, value, direction))
    return thresholds


def gate_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """Every gateable metric a report holds, by flat name (``None`` where the run measured nothing)."""
    found: dict[str, float | None] = {}
    for mode, data in (report.get("modes") or {}).items():
        for key, value in data.items():
            if isinstance(value, (int, float)) and key != "n":
                found[f"retrieval.{mode}.{key}"] = float(value)
    generation = report.get("generation") or {}
    for block, keys in (("rag", RAG_METRICS), ("baseline", BASELINE_METRICS)):
        data = generation.get(block)
        if isinstance(data, dict):
            for key in keys:
                value = data.get(key)
                found[f"{block}.{key}"] = None if value is None else float(value)
    held = generation.get("unanswerable")
    if isinstance(held, dict):
        found["unanswerable.abstention_rate"] = held.get("abstention_rate")
    summary = (report.get("images") or {}).get("summary")
    if isinstance(summary, dict):
        for key in IMAGE_METRICS:
            value = summary.get(key)
            found[f"images.{key}"] = None if value is None else float(value)
    for form, data in ((report.get("detector") or {}).get("forms") or {}).items():
        for key in DETECTOR_METRICS:
            value = data.get(key)
            found[f"detector.{form}.{key}"] = None if value is None else float(value)
    return found


def check_gates(report: dict[str, Any], thresholds: Sequence[Threshold]) -> list[dict[str, Any]]:
    """One entry per threshold: ``{"metric", "threshold", "direction", "value", "passed", "reason"}``."""
    values = gate_metrics(report)
    results = []
    for t in thresholds:
        value = values.get(t.metric)
        if value is None:
            passed, reason = False, "not measured in this run"
        else:
            passed = value >= t.value if t.direction == "under" else value <= t.value
            reason = "" if passed else f"{value:.4f} {'<' if t.direction == 'under' else '>'} {t.value:g}"
        results.append({"metric": t.metric, "threshold": t.value, "direction": t.direction, "value": value,
                        "passed": passed, "reason": reason, "rule": t.describe()})
    return results


# -- compare ------------------------------------------------------------------------------------------------------
def load_report(path: Path) -> tuple[Path, dict[str, Any]]:
    """A report.json, given as the file or the run folder holding it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise BadInputError(f"{str(path)!r} is not a report: give a report.json or the run folder (--out) holding "
                            "one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"cannot read the report {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{str(path)!r} is not an eval report (expected a JSON object)")
    return path.resolve(), data


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Every metric of either run: ``{"metric", "a", "b", "delta"}`` (``delta`` = b - a, ``None`` where one run
    lacks it), in the order of ``metric_names`` then alphabetical."""
    left, right = gate_metrics(a), gate_metrics(b)
    order = {name: i for i, name in enumerate(metric_names(generation=True, baseline=True, unanswerable=True,
                                                            detector=True, images=True))}
    names = sorted(set(left) | set(right), key=lambda n: (order.get(n, len(order)), n))
    rows = []
    for name in names:
        x, y = left.get(name), right.get(name)
        delta = None if x is None or y is None else round(y - x, 4)
        rows.append({"metric": name, "a": x, "b": y, "delta": delta})
    return rows
