"""Retrieval evaluation: every record's prompt through the retriever once per mode, scored against its gold files.

``run_retrieval_eval(runtime, records)`` ingests nothing: the caller has put the corpus into ``runtime``'s knowledge
base and made the records' gold paths absolute (``eval.datasets.resolve_gold``). Steps:
  1. check the modes and the records (every record needs gold sources or gold images, as absolute paths);
  2. per record, one query per mode, interleaved (record 1 in every mode, then record 2, ...) so that a slow spell of
     the machine does not land on one mode; one warm-up query per mode beforehand is not counted;
  3. a record with gold sources is a passage search (``k_text`` = depth, ``k_image`` = 0), and its ranked list is the
     ``source`` of each passage hit; a record with gold images is an image search (``k_text`` = 0), ranked by the
     source of each image hit; a record with both is searched for both in one query and scored twice;
  4. per mode: recall@1, recall@k, recall@10, MRR, nDCG@k, nDCG@10 (``eval.metrics``) and the latency of the
     ``retrieve`` call (query embedding included) at p50/p95; per record: the ranked sources and the rank of the first
     gold one in every mode.
Before step 2 the chunk collection is flushed (see ``_seal``): the figures are those of a sealed knowledge base.

Modes are the retriever's: ``dense``, ``bm25``, ``hybrid`` (dense + BM25 fused, no reranking even when a reranker
is configured) and ``hybrid+rerank`` (the same with the cross-encoder; reported as skipped when none is configured).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval import metrics
from eval.datasets import EvalRecord
from mmrag.errors import BadInputError
from mmrag.runtime import Runtime

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODES", "MODES", "run_retrieval_eval"]

MODES: tuple[str, ...] = ("dense", "bm25", "hybrid", "hybrid+rerank")
DEFAULT_MODES: tuple[str, ...] = MODES
DEPTH = 10  # results fetched per query: recall@10 and nDCG@10 need ten


@dataclass(frozen=True)
class _Target:
    """One thing a record is scored on: its passages (``text``) or its images (``image``)."""

    kind: str
    gold: frozenset[str]


def _targets(record: EvalRecord) -> list[_Target]:
    targets = []
    for kind, gold in (("text", record.gold_sources), ("image", record.gold_images)):
        if gold:
            relative = [g for g in gold if not Path(g).is_absolute()]
            if relative:
                raise BadInputError(f"record {record.id!r}: gold paths must be absolute (resolve them against the "
                                    f"corpus root with eval.datasets.resolve_gold), got {relative[0]!r}")
            targets.append(_Target(kind, frozenset(str(Path(g)) for g in gold)))
    if not targets:
        raise BadInputError(f"record {record.id!r} has no gold sources or gold images: retrieval evaluation "
                            "needs to know which files answer each prompt")
    return targets


def _query(record: EvalRecord, targets: list[_Target], mode: str, depth: int) -> Any:
    from retrieval.retriever import Query

    kinds = {t.kind for t in targets}
    return Query(text=record.prompt, k_text=depth if "text" in kinds else 0, k_image=depth if "image" in kinds else 0,
                 mode="hybrid" if mode == "hybrid+rerank" else mode,  # type: ignore[arg-type]
                 rerank=mode == "hybrid+rerank")


def _summary(per_target: list[tuple[str, Sequence[str], frozenset[str]]], latencies: list[float],
             k: int) -> dict[str, Any]:
    """Aggregate metrics for one mode over (kind, ranked sources, gold) triples."""
    def block(rows: list[tuple[str, Sequence[str], frozenset[str]]]) -> dict[str, Any]:
        cutoffs = sorted({1, k, DEPTH})
        data: dict[str, Any] = {"n": len(rows)}
        for cutoff in cutoffs:
            data[f"recall@{cutoff}"] = metrics.mean(metrics.recall_at_k(r, g, cutoff) for _, r, g in rows)
        data["mrr"] = metrics.mean(metrics.reciprocal_rank(r, g) for _, r, g in rows)
        for cutoff in sorted({k, DEPTH}):
            data[f"ndcg@{cutoff}"] = metrics.mean(metrics.ndcg_at_k(r, g, cutoff) for _, r, g in rows)
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in data.items()}

    result = block(per_target)
    result["latency_ms"] = {"p50": round(metrics.percentile(latencies, 50), 2),
                            "p95": round(metrics.percentile(latencies, 95), 2),
                            "mean": round(metrics.mean(latencies), 2)}
    kinds = sorted({kind for kind, _, _ in per_target})
    if len(kinds) > 1:
        result["by_target"] = {kind: block([row for row in per_target if row[0] == kind]) for kind in kinds}
    return result


def _seal(runtime: Runtime) -> None:
    """Flush the chunk collection, so the searches below meet sealed, indexed segments.

    Ingest does not flush. Rows that were never flushed stay in milvus-lite's in-memory table (replayed from its
    write-ahead log on every reopen, until 128 MB accumulate), and every BM25 search then rebuilds an inverted index
    over all of them in Python: about 240 ms a query at 1,000 passages instead of about 25 ms once flushed."""
    index = runtime.index
    start = time.perf_counter()
    try:
        index.client.flush(index.chunks)
    except Exception as exc:  # noqa: BLE001 - pymilvus raises many types
        from mmrag.errors import StoreError

        raise StoreError(f"Milvus at {index.uri} failed to flush {index.chunks}: {exc}") from exc
    logger.info("flushed %s in %.2f s", index.chunks, time.perf_counter() - start)


def run_retrieval_eval(runtime: Runtime, records: Sequence[EvalRecord], *, k: int = 5,
                       modes: Sequence[str] = DEFAULT_MODES, limit: int | None = None,
                       progress: bool = True, done: Mapping[str, dict[str, Any]] | None = None,
                       on_example: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate retrieval over ``records`` against the corpus already in ``runtime``'s knowledge base.

    ``done`` maps record ids to examples an earlier, interrupted attempt of the same run finished: they are not
    searched again, and count in the metrics as recorded. ``on_example(id, example)`` is called as each new example
    finishes (``eval.runstate`` appends it to the run's JSONL).

    Returns ``{"config", "modes": {mode: metrics}, "skipped": {mode: reason}, "examples": [...]}``; the metrics
    of a mode are ``n``, ``recall@1``, ``recall@k``, ``recall@10``, ``mrr``, ``ndcg@k``, ``ndcg@10`` and
    ``latency_ms`` (``p50``, ``p95``, ``mean``)."""
    from tqdm import tqdm

    from retrieval.retriever import Retriever

    # 1. Check inputs.
    if not 1 <= k <= DEPTH:
        raise BadInputError(f"k must be between 1 and {DEPTH}, got {k}")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise BadInputError(f"unknown retrieval mode(s) {unknown or list(modes)}: choose from {', '.join(MODES)}")
    if limit is not None and limit < 1:
        raise BadInputError(f"limit must be at least 1, got {limit}")
    chosen = list(records)[:limit] if limit is not None else list(records)
    if not chosen:
        raise BadInputError("no records to evaluate")
    targets = {record.id: _targets(record) for record in chosen}
    if len(targets) != len(chosen):
        raise BadInputError("record ids must be unique")
    skipped: dict[str, str] = {}
    active = list(dict.fromkeys(modes))
    if "hybrid+rerank" in active and runtime.models.reranker is None:
        skipped["hybrid+rerank"] = "no reranker configured (models.reranker)"
        active.remove("hybrid+rerank")
    if not active:
        raise BadInputError(f"none of the modes {list(modes)} can run: " + "; ".join(
            f"{m}: {why}" for m, why in skipped.items()))
    retriever = Retriever(runtime)
    if runtime.index.count() == 0:
        raise BadInputError(f"knowledge base {runtime.settings.milvus.collection!r} is empty: ingest the corpus "
                            "before evaluating retrieval")

    _seal(runtime)
    done = {i: e for i, e in (done or {}).items() if i in targets and set(e.get("modes", {})) == set(active)}
    todo = [record for record in chosen if record.id not in done]

    # 2. Warm up every mode once (first searches load the collection and the models).
    if todo:
        first = todo[0]
        for mode in active:
            retriever.retrieve(_query(first, targets[first.id], mode, DEPTH))

    # 3. Every record in every mode, interleaved.
    finished: dict[str, dict[str, Any]] = dict(done)
    desc = f"eval retrieval ({len(done)} resumed)" if done else "eval retrieval"
    for record in tqdm(todo, desc=desc, unit="prompt", disable=not progress, leave=False):
        example: dict[str, Any] = {
            "id": record.id, "prompt": record.prompt,
            "gold": {t.kind: sorted(t.gold) for t in targets[record.id]}, "modes": {}}
        for mode in active:
            query = _query(record, targets[record.id], mode, DEPTH)
            start = time.perf_counter()
            grounding = retriever.retrieve(query)
            elapsed = (time.perf_counter() - start) * 1000.0
            entry: dict[str, Any] = {"latency_ms": round(elapsed, 2)}
            for target in targets[record.id]:
                hits = grounding.text_hits if target.kind == "text" else grounding.image_hits
                ranked = [hit.source for hit in hits]
                entry[target.kind] = {
                    "rank": metrics.first_gold_rank(ranked, target.gold),
                    "retrieved": [{"source": hit.source, "chunk": hit.chunk.id, "score": hit.score}
                                  for hit in hits],
                }
            example["modes"][mode] = entry
        finished[record.id] = example
        if on_example is not None:
            on_example(record.id, example)

    # 4. Aggregate, from the examples (resumed ones included), in record order.
    examples = [finished[record.id] for record in chosen]
    scored: dict[str, list[tuple[str, Sequence[str], frozenset[str]]]] = {m: [] for m in active}
    latencies: dict[str, list[float]] = {m: [] for m in active}
    for record, example in zip(chosen, examples):
        for mode in active:
            entry = example["modes"][mode]
            latencies[mode].append(entry["latency_ms"])
            for target in targets[record.id]:
                scored[mode].append((target.kind, [hit["source"] for hit in entry[target.kind]["retrieved"]],
                                     target.gold))
    results = {mode: _summary(scored[mode], latencies[mode], k) for mode in active}
    for mode, data in results.items():
        logger.info("%s: recall@%d %.4f, MRR %.4f, p50 %.1f ms", mode, k, data[f"recall@{k}"], data["mrr"],
                    data["latency_ms"]["p50"])
    settings = runtime.settings.retrieval
    schema = runtime.index.schema() or {}
    config = {
        "k": k, "depth": DEPTH, "modes": list(modes), "records": len(chosen),
        "knowledge_base": runtime.settings.milvus.collection, "milvus_uri": runtime.settings.milvus_uri,
        "chunks": runtime.index.count(),
        "retrieval": settings.model_dump(),
        "encoders": {"text": schema.get("text"), "clip": schema.get("clip"),
                     "reranker": None if runtime.models.reranker is None else type(runtime.models.reranker).__name__},
    }
    return {"config": config, "modes": results, "skipped": skipped, "examples": examples}
