"""Query latency over 10k and 100k chunks in the embedded store, against llama-index on the same collection. Prints
JSON.

For each size, one knowledge base of synthetic passages (2 to 5 sentences drawn at random from the HaluEval
``knowledge`` passages) is written straight through ``MilvusIndex`` (the rows ``ingest.pipeline`` writes), with
random unit vectors as text vectors: embedding 100k passages with MiniLM would take about 35 minutes on the 2-core
machine, and a dense search costs the same whatever the vectors hold (random vectors are, if anything, the hard case
for HNSW). BM25 sees the real synthetic text. The collection is flushed once after the insert (build.flush_s): rows
milvus-lite never flushed are searched without their index, BM25 rebuilding its inverted index on every query.
Queries are HaluEval questions, embedded by the real MiniLM on every call. Then, interleaved query by query, in a
rotating order:
- ours, hybrid: ``Retriever(runtime).retrieve(Query(text=q, k_text=5, k_image=0))`` (dense + BM25 fused, MMR);
- ours, dense: the same with ``mode="dense"``;
- llama-index, dense: ``VectorStoreIndex.from_vector_store(MilvusVectorStore(...)).as_retriever(similarity_top_k=5)
  .retrieve(q)`` over the same milvus-lite data dir and collection (opened in this process: milvus-lite serves one
  data dir per process, and pymilvus reuses that server for a second client), with the same MiniLM behind a
  llama-index ``BaseEmbedding``;
- the query embedding alone, to show what part of each figure is the model;
- one bare Milvus search of each kind as the retriever sends it (its filter and candidate limit, ids only): dense
  (a fixed vector) and BM25 (the question), to show what part of each figure is the store;
- with ``--compare-analyzer``, the hybrid path and the bare BM25 search again over a second knowledge base with the
  same rows and Milvus' default BM25 analyzer (English stop words kept: what knowledge bases created before
  ``milvus.bm25_stop_words`` had), so the two analyzers are compared in one run.
Latency is wall time per call (embedding included): p50, p95, p99 and mean over the queries, and the ratios of the
p50s. Targets: ours p50 <= 50 ms at 100k chunks, and faster than the llama-index path. The load average at the start
and the end is printed: the machine is shared, so read the ratios.

    python benchmarks/search.py [--sizes 10000 100000] [--queries 100] [--index-type HNSW] [--compare-analyzer]
                                [--work-dir DIR]

``--work-dir`` builds the knowledge bases there, or reuses the ones an earlier run left there (a 100k build is the
slow part).

Building takes about 5 s for 10k chunks and 2 minutes for 100k (milvus-lite 3.2 inserts about 1,000 rows/s at that
size, computing BM25 vectors in Python); a first search of a fresh 100k collection takes about 40 s more (warm_up_s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)


def sentences(halueval: Path) -> list[str]:
    """Every sentence of the HaluEval knowledge passages (some passages glue sentences without a space)."""
    found: list[str] = []
    for line in halueval.open(encoding="utf-8"):
        text = json.loads(line)["knowledge"]
        for part in re.split(r"(?<=[.!?])\s*(?=[A-Z])", text):
            part = " ".join(part.split())
            if len(part) > 20:
                found.append(part)
    return found


def synthetic_rows(start: int, n: int, pool: list[str], dim: int, seed: int, tenant: str) -> list[dict[str, Any]]:
    """Chunk rows ``start`` to ``start + n`` as ``ingest.pipeline`` writes them: 10 chunks a document, random unit
    text vectors."""
    import numpy as np

    rng = random.Random(seed * 1_000_003 + start)
    vectors = np.random.default_rng(seed * 1_000_003 + start).standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    for j in range(n):
        i = start + j
        doc = i // 10
        rows.append({
            "id": uuid.UUID(int=rng.getrandbits(128)).hex, "doc_id": f"{doc:032x}", "tenant": tenant,
            "modality": "text", "text": " ".join(rng.sample(pool, rng.randint(2, 5))),
            "source": f"/synthetic/doc-{doc:06d}.txt", "page": -1, "position": i % 10, "blob": "", "version": "v1",
            "meta": {}, "text_vector": vectors[j].tolist(),
        })
    return rows


def llama_embedding(embedder: Any) -> Any:
    """Our text embedder as a llama-index ``BaseEmbedding`` (the same MiniLM, the same precision)."""
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from pydantic import PrivateAttr

    class Embedding(BaseEmbedding):
        _embedder: Any = PrivateAttr()

        def __init__(self, inner: Any) -> None:
            super().__init__(model_name=inner.signature.model)
            self._embedder = inner

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._embedder.encode([query])[0].tolist()

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._embedder.encode([text])[0].tolist()

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

    return Embedding(embedder)


def stats(values: list[float]) -> dict[str, float]:
    from eval.metrics import mean, percentile

    return {"p50": round(percentile(values, 50), 2), "p95": round(percentile(values, 95), 2),
            "p99": round(percentile(values, 99), 2), "mean": round(mean(values), 2)}


def build_kb(size: int, work: Path, embedder: Any, pool: list[str], index_type: str, stop_words: bool,
             progress: bool) -> tuple[Any, dict[str, Any]]:
    """A runtime over a knowledge base of ``size`` synthetic chunks under ``work``: built (rows straight into Milvus,
    then one flush, which seals the segments and builds their indexes; unflushed rows would be searched by brute
    force, BM25 rebuilding its index on every query), or reused when ``work`` already holds it (``--work-dir``)."""
    from tqdm import tqdm

    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    name = f"kb{size}" if stop_words else f"kb{size}-default-analyzer"
    # No call time limit: under load, one 1,000-row upsert into a large milvus-lite collection (which may flush
    # and compact) can take longer than the profile's 30 s.
    settings = load_settings(data_dir=work / name, milvus={
        "collection": f"bench{size}", "index_type": index_type, "write_batch": 1000, "timeout_s": None,
        "bm25_stop_words": stop_words})
    runtime = Runtime(settings, ModelSet(settings, text_embedder=embedder, clip=None))
    index = runtime.index
    if index.exists() and index.count() == size:
        return runtime, {"reused": True}
    index.ensure(embedder.signature, None)
    generate_s = insert_s = 0.0
    step = 10_000
    for offset in tqdm(range(0, size, step), desc=f"insert {size:,}", unit="10k rows", disable=not progress,
                       leave=False, file=sys.stderr):
        start = time.perf_counter()
        rows = synthetic_rows(offset, min(step, size - offset), pool, embedder.signature.dim, seed=size,
                              tenant=settings.tenant)
        generate_s += time.perf_counter() - start
        start = time.perf_counter()
        index.upsert_chunks(rows)
        insert_s += time.perf_counter() - start
    start = time.perf_counter()
    index.client.flush(index.chunks)
    flush_s = time.perf_counter() - start
    assert index.count() == size, f"expected {size} chunks, found {index.count()}"
    return runtime, {"generate_rows_s": round(generate_s, 1), "insert_s": round(insert_s, 1),
                     "insert_rows_per_s": round(size / insert_s), "flush_s": round(flush_s, 1)}


def bench_size(size: int, work: Path, embedder: Any, pool: list[str], questions: list[str],
               index_type: str, compare_analyzer: bool, progress: bool) -> dict[str, Any]:
    from llama_index.core import VectorStoreIndex
    from llama_index.vector_stores.milvus import MilvusVectorStore
    from tqdm import tqdm

    from retrieval.retriever import TEXT_MODALITIES, Query, Retriever

    # 1. The knowledge base (BM25 without English stop words, the default), and with --compare-analyzer a second
    #    one with the same rows and Milvus' default analyzer (what knowledge bases created before had).
    runtime, build = build_kb(size, work, embedder, pool, index_type, True, progress)
    runtimes = {"": runtime}
    builds = {"stop_words": build}
    if compare_analyzer:
        runtimes["_default_analyzer"], builds["default_analyzer"] = build_kb(
            size, work, embedder, pool, index_type, False, progress)
    index = runtime.index
    settings = runtime.settings

    # 2. The paths over the same collection and model.
    store = MilvusVectorStore(uri=settings.milvus_uri, collection_name=index.chunks, dim=embedder.signature.dim,
                              embedding_field="text_vector", text_key="text", doc_id_field="doc_id", overwrite=False,
                              similarity_metric="COSINE", use_async_client=False)
    llama = VectorStoreIndex.from_vector_store(store, embed_model=llama_embedding(embedder)).as_retriever(
        similarity_top_k=5)
    limit = 5 * settings.retrieval.candidates
    expr = f'tenant == "{settings.tenant}" and modality in {TEXT_MODALITIES}'

    def raw_search(field: str, metric: str, vector: Any, run: Any = runtime) -> Any:
        """One bare Milvus search as the retriever sends it (its filter and candidate limit), ids only."""
        return run.index.client.search(run.index.chunks, data=[vector], anns_field=field, limit=limit,
                                       search_params={"metric_type": metric}, filter=expr, output_fields=["id"])

    fixed_vector = embedder.encode(["a fixed query vector"])[0].tolist()
    paths: dict[str, Any] = {}
    for suffix, run in runtimes.items():
        retriever = Retriever(run)
        paths[f"ours_hybrid{suffix}"] = (
            lambda q, r=retriever: r.retrieve(Query(text=q, k_text=5, k_image=0)).text_hits)
        paths[f"milvus_bm25_search{suffix}"] = lambda q, r=run: raw_search("sparse", "BM25", q, r)
    paths |= {
        "ours_dense": lambda q, r=Retriever(runtime): r.retrieve(Query(text=q, k_text=5, k_image=0,
                                                                       mode="dense")).text_hits,
        "llama_index_dense": lambda q: llama.retrieve(q),
        "milvus_dense_search": lambda q: raw_search("text_vector", "COSINE", fixed_vector),
        "embedding_only": lambda q: embedder.encode([q]),
    }
    # 3. Warm up (the first searches load segments and build what the index builds lazily), timed.
    start = time.perf_counter()
    for q in questions[:5]:
        for call in paths.values():
            call(q)
    warm_s = time.perf_counter() - start
    found = {name: len(call(questions[0])) for name, call in paths.items() if name.startswith(("ours", "llama"))}
    # 4. Interleaved, the order rotating from query to query.
    names = list(paths)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for i, q in enumerate(tqdm(questions, desc=f"search {size:,}", unit="query", disable=not progress, leave=False,
                               file=sys.stderr)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            paths[name](q)
            latencies[name].append((time.perf_counter() - start) * 1000.0)
    store.client.close()
    for run in runtimes.values():
        run.close()
    p50 = {name: percentile_of(values) for name, values in latencies.items()}
    ratios = {"llama_index_dense_over_ours_hybrid_p50": round(p50["llama_index_dense"] / p50["ours_hybrid"], 2)}
    if compare_analyzer:
        ratios["default_analyzer_over_stop_words_hybrid_p50"] = round(
            p50["ours_hybrid_default_analyzer"] / p50["ours_hybrid"], 2)
        ratios["default_analyzer_over_stop_words_bm25_search_p50"] = round(
            p50["milvus_bm25_search_default_analyzer"] / p50["milvus_bm25_search"], 2)
    return {
        "chunks": size,
        "build": builds | {"warm_up_s": round(warm_s, 1)},
        "hits_per_query": found,
        "latency_ms": {name: stats(values) for name, values in latencies.items()},
        "ratios": ratios,
    }


def percentile_of(values: list[float]) -> float:
    from eval.metrics import percentile

    return percentile(values, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="chunks per knowledge base")
    parser.add_argument("--queries", type=int, default=100, help="HaluEval questions timed per path and size")
    parser.add_argument("--index-type", default=None, help="dense index [default: the profile's]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the knowledge bases (printed as work_dir)")
    parser.add_argument("--work-dir", type=Path, default=None, help="build the knowledge bases here, or reuse the "
                        "ones a --keep run left there (kept afterwards)")
    parser.add_argument("--compare-analyzer", action="store_true", help="also time the hybrid path and the bare "
                        "BM25 search on a copy of each knowledge base with Milvus' default BM25 analyzer (stop words "
                        "kept), interleaved with the rest")
    args = parser.parse_args()
    _common.offline_env()

    from importlib.metadata import version

    from mmrag.config import load_settings
    from mmrag.device import configure_threads
    from mmrag.models import ModelSet

    configure_threads(args.threads)
    data = _common.shared_data()
    halueval = data / "halueval" / "qa_dev.jsonl"
    pool = sentences(halueval)
    questions = [json.loads(line)["question"] for line in halueval.open(encoding="utf-8")][: args.queries]
    base = load_settings()
    index_type = args.index_type or base.milvus.index_type
    embedder = ModelSet(base).text_embedder
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mmrag-search-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = args.keep or args.work_dir is not None
    progress = sys.stderr.isatty()
    load_start = [round(x, 1) for x in os.getloadavg()]
    results = [bench_size(size, work, embedder, pool, questions, index_type, args.compare_analyzer, progress)
               for size in args.sizes]
    out = {
        "benchmark": "search",
        "store": f"milvus-lite {version('milvus-lite')} embedded (pymilvus {version('pymilvus')}), "
                 f"llama-index-vector-stores-milvus {version('llama-index-vector-stores-milvus')}",
        "dense_index": {"type": index_type, "params": base.milvus.index_params if index_type not in
                        ("FLAT", "AUTOINDEX") else {}},
        "text_embedder": f"{embedder.signature.model} ({embedder.signature.dim}-d), real weights, every query",
        "corpus": f"synthetic passages of 2-5 sentences from {len(pool):,} HaluEval knowledge sentences; random unit "
                  "text vectors (embedding 100k passages with MiniLM would take ~35 min here; search cost does not "
                  "depend on the vector values); BM25 over the real text",
        "queries": len(questions),
        "k": 5,
        "retrieval": {"candidates": base.retrieval.candidates, "mmr_lambda": base.retrieval.mmr_lambda,
                      "fusion": base.retrieval.fusion},
        "sizes": {str(r["chunks"]): r for r in results},
        "targets": {"ours_p50_ms_at_100k": 50, "ours_faster_than_llama_index": True},
        "machine": _common.machine(),
        "load_average_1_5_15_min": {"start": load_start, "end": [round(x, 1) for x in os.getloadavg()]},
    }
    if keep:
        out["work_dir"] = str(work)
    print(json.dumps(out, indent=2))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
