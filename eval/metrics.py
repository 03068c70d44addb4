"""Ranking metrics over one ranked list of ids and a set of gold ids, and their aggregation.

Every function is pure. A ranked list may name the same id more than once (two chunks of one source document);
an id counts once, at its first rank, so no metric can exceed 1. Relevance is binary: an id is gold or it is not.

- ``recall_at_k``: the share of the gold ids found in the first ``k`` (with one gold id: 1 if it is there, else 0);
- ``reciprocal_rank``: ``1 / rank`` of the first gold id in the whole list, 0 when none is in it (its mean is MRR);
- ``ndcg_at_k``: DCG over the first ``k`` with gain 1 and discount ``1 / log2(rank + 1)``, divided by the DCG of an
  ideal list, which puts ``min(k, #gold)`` gold ids first;
- ``first_gold_rank``: the 1-based rank of the first gold id, or ``None``;
- ``mean`` and ``percentile`` aggregate per-example values.

Answer metrics (generation evaluation) compare a generated answer with a gold answer after ``normalize_answer``:
lower case, apostrophes dropped ("Arthur's" -> "arthurs"), every other punctuation character (Unicode category P*,
so dashes and curly quotes too) and symbol turned into a space, the articles a/an/the removed, whitespace collapsed.
- ``answer_contains``: 1 when the normalised gold answer occurs in the normalised answer on word boundaries ("1964"
  is in "introduced in 1964", not in "19645"), else 0;
- ``token_f1``: SQuAD's token F1: the harmonic mean of precision and recall of the normalised answer's tokens
  against the gold's, counting shared tokens with multiplicity (1 when both are empty, 0 when one is);
- ``citation_precision``: the share of cited sources that are gold (``None`` when nothing is cited: no citation,
  no precision);
- ``citation_recall``: the share of the gold sources that are cited at least once.

Support metrics take, per answer, one flag per checked sentence (supported by its evidence or not):
- ``faithfulness``: the share of an answer's checked sentences that are supported (``None`` with none checked);
- ``hallucination_rate``: over answers, the share with at least one unsupported sentence (``None`` for no answers).

Detector metrics score a support scorer as a classifier (labels: 1 = supported/right, 0 = hallucinated):
- ``auroc``: the probability that a random positive scores above a random negative, ties counting one half
  (the Mann-Whitney U statistic over #positives x #negatives);
- ``binary_f1``: F1 of predicted against actual flags (the positive class is whatever ``True`` means to the caller);
- ``best_threshold``: the threshold that maximises the F1 of detecting negatives as ``score < threshold``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable, Sequence

__all__ = ["answer_contains", "auroc", "best_threshold", "binary_f1", "citation_precision", "citation_recall",
           "dedupe", "faithfulness", "first_gold_rank", "hallucination_rate", "mean", "ndcg_at_k", "normalize_answer",
           "percentile", "recall_at_k", "reciprocal_rank", "token_f1"]


def _check(gold: Collection[str], k: int | None = None) -> None:
    if not gold:
        raise ValueError("gold ids are empty: a ranking metric needs at least one relevant id")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def dedupe(ranked: Sequence[str]) -> list[str]:
    """The ranked ids with repeats removed, each kept at its first rank."""
    return list(dict.fromkeys(ranked))


def first_gold_rank(ranked: Sequence[str], gold: Collection[str]) -> int | None:
    """1-based rank of the first gold id (after de-duplication), or ``None`` when no gold id is in the list."""
    _check(gold)
    for rank, item in enumerate(dedupe(ranked), 1):
        if item in gold:
            return rank
    return None


def recall_at_k(ranked: Sequence[str], gold: Collection[str], k: int) -> float:
    """Share of the gold ids that appear among the first ``k`` distinct ranked ids."""
    _check(gold, k)
    wanted = set(gold)
    found = sum(1 for item in dedupe(ranked)[:k] if item in wanted)
    return found / len(wanted)


def reciprocal_rank(ranked: Sequence[str], gold: Collection[str]) -> float:
    """``1 / rank`` of the first gold id, 0.0 when no gold id is in the list."""
    rank = first_gold_rank(ranked, gold)
    return 0.0 if rank is None else 1.0 / rank


def ndcg_at_k(ranked: Sequence[str], gold: Collection[str], k: int) -> float:
    """Normalised DCG at ``k`` with binary relevance and the ``log2(rank + 1)`` discount."""
    _check(gold, k)
    wanted = set(gold)
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(dedupe(ranked)[:k], 1) if item in wanted)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(wanted)) + 1))
    return dcg / ideal


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; a ValueError for no values (an empty evaluation has no score, not a score of 0)."""
    items = [float(v) for v in values]
    if not items:
        raise ValueError("mean of no values")
    return math.fsum(items) / len(items)


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    items = sorted(float(v) for v in values)
    if not items:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    position = (len(items) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(items) - 1)
    return items[low] + (items[high] - items[low]) * (position - low)


# -- answers ----------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_APOSTROPHES = str.maketrans("", "", "'\u2019\u2018\u02bc`")


def normalize_answer(text: str) -> str:
    """Lower case, no apostrophes, other punctuation and symbols as spaces, no articles, single spaces."""
    text = text.lower().translate(_APOSTROPHES)
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_contains(answer: str, gold: str) -> float:
    """1.0 when the normalised gold answer occurs in the normalised answer on word boundaries, else 0.0."""
    wanted = normalize_answer(gold)
    if not wanted:
        raise ValueError(f"gold answer {gold!r} is empty once normalised")
    return 1.0 if f" {wanted} " in f" {normalize_answer(answer)} " else 0.0


def token_f1(answer: str, gold: str) -> float:
    """SQuAD token F1 between the normalised answer and gold answer."""
    predicted = normalize_answer(answer).split()
    wanted = normalize_answer(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    shared = sum((Counter(predicted) & Counter(wanted)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(predicted)
    recall = shared / len(wanted)
    return 2 * precision * recall / (precision + recall)


def citation_precision(cited: Sequence[str], gold: Collection[str]) -> float | None:
    """Share of the cited sources (one entry per citation) that are gold; ``None`` when nothing is cited."""
    _check(gold)
    if not cited:
        return None
    return sum(1 for source in cited if source in gold) / len(cited)


def citation_recall(cited: Collection[str], gold: Collection[str]) -> float:
    """Share of the gold sources cited at least once."""
    _check(gold)
    wanted = set(gold)
    return len(wanted & set(cited)) / len(wanted)


# -- support ----------------------------------------------------------------------------------------------------
def faithfulness(supported: Sequence[bool]) -> float | None:
    """Share of an answer's checked sentences that its evidence supports; ``None`` when no sentence was checked."""
    if not supported:
        return None
    return sum(1 for flag in supported if flag) / len(supported)


def hallucination_rate(answers: Sequence[Sequence[bool]]) -> float | None:
    """Share of the answers with at least one unsupported sentence; ``None`` for no answers."""
    if not answers:
        return None
    return sum(1 for flags in answers if not all(flags)) / len(answers)


# -- detectors --------------------------------------------------------------------------------------------------
def _labelled(scores: Sequence[float], labels: Sequence[int | bool]) -> tuple[list[float], list[float]]:
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    positives = [float(s) for s, y in zip(scores, labels) if y]
    negatives = [float(s) for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        raise ValueError("AUROC needs at least one positive and one negative label")
    return positives, negatives


def auroc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting 1/2."""
    positives, negatives = _labelled(scores, labels)
    # Rank-sum form of the Mann-Whitney U statistic, with average ranks for ties.
    values = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum = 0.0
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1][0] == values[i][0]:
            j += 1
        average = (i + j) / 2 + 1  # 1-based average rank of the tied block
        rank_sum += average * sum(label for _, label in values[i:j + 1])
        i = j + 1
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_f1(predicted: Sequence[bool], actual: Sequence[bool]) -> float:
    """F1 of the ``True`` class: 2TP / (2TP + FP + FN); 0.0 when there is no true positive."""
    if len(predicted) != len(actual):
        raise ValueError(f"{len(predicted)} predictions but {len(actual)} labels")
    tp = sum(1 for p, a in zip(predicted, actual) if p and a)
    fp = sum(1 for p, a in zip(predicted, actual) if p and not a)
    fn = sum(1 for p, a in zip(predicted, actual) if a and not p)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def best_threshold(scores: Sequence[float], labels: Sequence[int | bool]) -> tuple[float, float]:
    """(threshold, F1) maximising the F1 of flagging negatives (label 0) as ``score < threshold``; candidate
    thresholds are the distinct scores and one above the highest. Ties keep the lowest threshold."""
    _labelled(scores, labels)
    actual = [not y for y in labels]
    candidates = sorted(set(float(s) for s in scores))
    candidates.append(math.nextafter(candidates[-1], math.inf))  # flags every score
    best = (candidates[0], -1.0)
    for threshold in candidates:
        f1 = binary_f1([s < threshold for s in scores], actual)
        if f1 > best[1]:
            best = (threshold, f1)
    return best
