"""A support scorer measured as a hallucination detector on HaluEval QA.

Every HaluEval record gives a labelled pair for one knowledge passage: its right answer (label 1, supported) and its
hallucinated answer (label 0). The scorer scores each answer against the passage; a good detector scores the right
answer higher. ``run_detector_eval(scorer, pairs, threshold)`` reports, per form of the answers:
  - ``raw``: the answers as HaluEval ships them. Right answers are mostly short spans ("Delhi") and hallucinated
    ones sentences ("The head office is in Mumbai."), so length and form alone separate them: a scorer that only
    counts words can look good here and fail elsewhere;
  - ``sentence``: both answers rewritten into one sentence form, ``The answer to <question> is <answer>.``
    (``sentence_form``), so form and length no longer give the label away.
Metrics per form (``DEFINITIONS``): AUROC, F1 of flagging hallucinations at the chosen threshold (``score <
threshold``; the threshold the product uses, ``generation.min_support``), the best F1 over thresholds (optimistic:
chosen on the same data) with its threshold, and the mean score of each class.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval import metrics
from eval.datasets import _read_jsonl, _string
from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["DEFINITIONS", "FORMS", "DetectorPair", "halueval_pairs", "run_detector_eval", "sentence_form"]

FORMS: tuple[str, ...] = ("raw", "sentence")

DEFINITIONS: dict[str, str] = {
    "pairs": "HaluEval QA records: the right answer (label supported) and the hallucinated answer (label "
             "hallucinated), each scored against the record's knowledge passage",
    "raw": "the answers as HaluEval ships them (right answers are mostly short spans, hallucinated ones sentences)",
    "sentence": "both answers rewritten as 'The answer to <question> is <answer>.' so length and form cannot give "
                "the label away",
    "auroc": "probability that the right answer of a random pair scores above the hallucinated answer of a random "
             "pair (area under the ROC curve; ties count one half; 0.5 is chance)",
    "f1": "F1 of flagging hallucinated answers (score < threshold) at the chosen threshold "
          "(generation.min_support, the threshold the product flags sentences with)",
    "precision / recall": "of flagging hallucinated answers at the chosen threshold",
    "best_f1 / best_threshold": "the highest F1 over all thresholds and the threshold that gives it (chosen on the "
                                "same data: optimistic)",
    "mean_right / mean_hallucinated": "mean support score of each class",
}


@dataclass(frozen=True)
class DetectorPair:
    id: str
    question: str
    knowledge: str
    right: str
    hallucinated: str


def halueval_pairs(path: Path, limit: int | None = None) -> list[DetectorPair]:
    """Labelled pairs from a HaluEval QA ``.jsonl`` (``knowledge``, ``question``, ``right_answer``,
    ``hallucinated_answer``)."""
    if limit is not None and limit < 1:
        raise BadInputError(f"limit must be at least 1, got {limit}")
    pairs: list[DetectorPair] = []
    for number, data in _read_jsonl(Path(path)):
        where = f"{path}:{number}"
        pairs.append(DetectorPair(
            id=str(data.get("id") or f"halueval-{len(pairs):05d}"),
            question=_string(data, "question", where) or "",
            knowledge=_string(data, "knowledge", where) or "",
            right=_string(data, "right_answer", where) or "",
            hallucinated=_string(data, "hallucinated_answer", where) or "",
        ))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise BadInputError(f"HaluEval file {str(path)!r} holds no records")
    return pairs


def sentence_form(question: str, answer: str) -> str:
    """``The answer to <question without its question mark> is <answer without its final full stop>.``"""
    question = re.sub(r"[\s?]+$", "", " ".join(question.split()))
    answer = re.sub(r"[\s.]+$", "", " ".join(answer.split()))
    return f"The answer to {question} is {answer}."


def _claims(pair: DetectorPair, form: str) -> tuple[str, str]:
    if form == "raw":
        return pair.right, pair.hallucinated
    return sentence_form(pair.question, pair.right), sentence_form(pair.question, pair.hallucinated)


def _form_metrics(right: list[float], hallucinated: list[float], threshold: float) -> dict[str, Any]:
    scores = right + hallucinated
    labels = [1] * len(right) + [0] * len(hallucinated)
    flagged = [s < threshold for s in scores]
    actual = [not y for y in labels]
    tp = sum(1 for f, a in zip(flagged, actual) if f and a)
    best_t, best_f1 = metrics.best_threshold(scores, labels)
    return {
        "n": len(right),
        "auroc": round(metrics.auroc(scores, labels), 4),
        "f1": round(metrics.binary_f1(flagged, actual), 4),
        "precision": round(tp / sum(flagged), 4) if any(flagged) else None,
        "recall": round(tp / sum(actual), 4),
        "best_f1": round(best_f1, 4),
        "best_threshold": round(best_t, 4),
        "mean_right": round(metrics.mean(right), 4),
        "mean_hallucinated": round(metrics.mean(hallucinated), 4),
    }


def run_detector_eval(scorer: Any, pairs: Sequence[DetectorPair], *, threshold: float = 0.5,
                      forms: Sequence[str] = FORMS, progress: bool = True) -> dict[str, Any]:
    """Score both answers of every pair in every form; ``{"config", "definitions", "forms": {form: metrics},
    "examples"}``."""
    from tqdm import tqdm

    from generation.support import score_pairs

    # 1. Check inputs.
    if not pairs:
        raise BadInputError("no pairs to evaluate")
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise BadInputError(f"unknown detector form(s) {unknown or list(forms)}: choose from {', '.join(FORMS)}")
    if not 0.0 <= threshold <= 1.0:
        raise BadInputError(f"threshold must be between 0 and 1, got {threshold}")

    # 2. Score, in slices so progress moves and a batching scorer gets full batches.
    start = time.perf_counter()
    scores: dict[str, list[tuple[float, float]]] = {form: [] for form in forms}
    step = 32
    with tqdm(total=len(pairs) * len(forms), desc="eval detector", unit="pair", disable=not progress,
              leave=False) as bar:
        for form in forms:
            for offset in range(0, len(pairs), step):
                chunk = pairs[offset:offset + step]
                items = []
                for pair in chunk:
                    right, wrong = _claims(pair, form)
                    items += [(right, [pair.knowledge]), (wrong, [pair.knowledge])]
                values = score_pairs(scorer, items)
                scores[form] += list(zip(values[0::2], values[1::2]))
                bar.update(len(chunk))
    seconds = time.perf_counter() - start

    # 3. Aggregate.
    results = {form: _form_metrics([r for r, _ in scores[form]], [h for _, h in scores[form]], threshold)
               for form in forms}
    for form, data in results.items():
        logger.info("detector %s: AUROC %.4f, F1 %.4f", form, data["auroc"], data["f1"])
    examples = []
    for index, pair in enumerate(pairs):
        example: dict[str, Any] = {"id": pair.id, "question": pair.question, "right": pair.right,
                                   "hallucinated": pair.hallucinated}
        for form in forms:
            right, wrong = scores[form][index]
            example[form] = {"right": round(right, 4), "hallucinated": round(wrong, 4)}
        examples.append(example)
    config = {"scorer": getattr(scorer, "name", type(scorer).__name__), "threshold": threshold,
              "pairs": len(pairs), "forms": list(forms), "seconds": round(seconds, 2),
              "pairs_per_s": round(len(pairs) * len(forms) / seconds, 1) if seconds > 0 else None}
    return {"config": config, "definitions": DEFINITIONS, "forms": results, "examples": examples}
