"""Ranking metrics over one ranked list of ids and a set of gold ids, and their aggregation.

Every function is pure. A ranked list may name the same id more than once (two chunks of one source document);
an id counts once, at its first rank, so no metric can exceed 1. Relevance is binary: an id is gold or it is not.

- ``recall_at_k``: the share of the gold ids found in the first ``k`` (with one gold id: 1 if it is there, else 0);
- ``reciprocal_rank``: ``1 / rank`` of the first gold id in the whole list, 0 when none is in it (its mean is MRR);
- ``ndcg_at_k``: DCG over the first ``k`` with gain 1 and discount ``1 / log2(rank + 1)``, divided by the DCG of an
  ideal list, which puts ``min(k, #gold)`` gold ids first;
- ``first_gold_rank``: the 1-based rank of the first gold id, or ``None``;
- ``mean`` and ``percentile`` aggregate per-example values.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence

__all__ = ["dedupe", "first_gold_rank", "mean", "ndcg_at_k", "percentile", "recall_at_k", "reciprocal_rank"]


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
