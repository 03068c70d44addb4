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
  no precision).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable, Sequence

__all__ = ["answer_contains", "citation_precision", "dedupe", "first_gold_rank", "mean", "ndcg_at_k",
           "normalize_answer", "percentile", "recall_at_k", "reciprocal_rank", "token_f1"]


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
