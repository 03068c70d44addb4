"""Retrieval evaluation: the metrics against hand-computed values, the dataset adapters on the shared third-party
data, ``run_retrieval_eval`` end to end on real milvus-lite and MiniLM (HaluEval and Tux Paint slices, the
cross-encoder mode with a tiny random CrossEncoder), and ``mmrag eval`` in a subprocess with its error cases."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from eval import metrics
from eval.datasets import EvalRecord, halueval, load_jsonl, resolve_gold, tuxpaint
from mmrag.errors import BadInputError

# -- metrics ------------------------------------------------------------------------------------------------------


def test_recall_at_k():
    ranked = ["a", "b", "c", "d"]
    assert metrics.recall_at_k(ranked, {"c"}, 1) == 0.0
    assert metrics.recall_at_k(ranked, {"c"}, 2) == 0.0
    assert metrics.recall_at_k(ranked, {"c"}, 3) == 1.0
    assert metrics.recall_at_k(ranked, {"a", "d", "x"}, 2) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(ranked, {"a", "d", "x"}, 10) == pytest.approx(2 / 3)
    # A source named twice (two chunks of one document) counts once, at its first rank.
    assert metrics.recall_at_k(["a", "a", "b"], {"b"}, 2) == 1.0
    assert metrics.recall_at_k([], {"a"}, 5) == 0.0


def test_reciprocal_rank_and_first_gold_rank():
    assert metrics.reciprocal_rank(["g", "x"], {"g"}) == 1.0
    assert metrics.reciprocal_rank(["x", "y", "g"], {"g"}) == pytest.approx(1 / 3)
    assert metrics.reciprocal_rank(["x", "y"], {"g"}) == 0.0
    assert metrics.reciprocal_rank(["x", "x", "g"], {"g", "h"}) == 0.5
    assert metrics.first_gold_rank(["x", "x", "g"], {"g"}) == 2
    assert metrics.first_gold_rank(["x"], {"g"}) is None
    assert metrics.mean([metrics.reciprocal_rank(r, {"g"}) for r in (["g"], ["x", "g"], ["x"])]) == pytest.approx(0.5)


def test_ndcg_at_k():
    # One gold id: 1 at rank 1, 1/log2(3) at rank 2, 0 beyond k.
    assert metrics.ndcg_at_k(["g", "x"], {"g"}, 5) == 1.0
    assert metrics.ndcg_at_k(["x", "g"], {"g"}, 5) == pytest.approx(0.6309298, abs=1e-6)
    assert metrics.ndcg_at_k(["x", "y", "g"], {"g"}, 2) == 0.0
    # Two gold ids at ranks 2 and 4. At k=3: DCG = 1/log2(3) = 0.63093, ideal = 1 + 1/log2(3) = 1.63093.
    ranked = ["x", "g1", "y", "g2"]
    assert metrics.ndcg_at_k(ranked, {"g1", "g2"}, 3) == pytest.approx(0.386853, abs=1e-6)
    # At k=4: DCG = 1/log2(3) + 1/log2(5) = 1.061606; the ideal list still holds min(4, 2) = 2 gold ids.
    assert metrics.ndcg_at_k(ranked, {"g1", "g2"}, 4) == pytest.approx(0.650920, abs=1e-6)
    # More gold ids than k: the ideal is capped at k, so a full list of gold scores 1.
    assert metrics.ndcg_at_k(["a", "b"], {"a", "b", "c"}, 2) == pytest.approx(1.0)
    assert metrics.ndcg_at_k(["g", "g", "g"], {"g"}, 3) == 1.0  # repeats cannot push it above 1


def test_metric_input_errors_and_aggregates():
    with pytest.raises(ValueError, match="gold ids are empty"):
        metrics.recall_at_k(["a"], set(), 1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        metrics.ndcg_at_k(["a"], {"a"}, 0)
    with pytest.raises(ValueError, match="mean of no values"):
        metrics.mean([])
    assert metrics.mean([1, 2, 4]) == pytest.approx(7 / 3)
    assert metrics.percentile([4, 1, 3, 2], 50) == 2.5
    assert metrics.percentile([10.0], 95) == 10.0
    values = [float(v) for v in range(1, 101)]
    assert metrics.percentile(values, 95) == pytest.approx(95.05)  # numpy.percentile(range(1, 101), 95)
    assert metrics.percentile(values, 0) == 1.0 and metrics.percentile(values, 100) == 100.0


# -- datasets -----------------------------------------------------------------------------------------------------


def test_halueval_adapter(shared, tmp_path):
    path = shared / "halueval" / "qa_dev.jsonl"
    raw = [json.loads(line) for line in path.open()]
    records, build = halueval(path)
    assert len(records) == 1000
    assert records[0] == EvalRecord(id="halueval-qa-00000", prompt=raw[0]["question"],
                                    gold_answer=raw[0]["right_answer"], gold_sources=("passage-00000.txt",),
                                    tags=("halueval", "qa"))
    corpus = build(tmp_path / "corpus")
    # Two questions share one passage: 999 distinct passages, one file each, and both questions point to it.
    assert len(corpus.files) == 999 and len({f.read_text() for f in corpus.files}) == 999
    by_passage: dict[str, set[str]] = {}
    for record, item in zip(records, raw):
        by_passage.setdefault(" ".join(item["knowledge"].split()), set()).add(record.gold_sources[0])
    assert all(len(names) == 1 for names in by_passage.values())
    resolved = resolve_gold(records, corpus.root)
    for record, item in zip(resolved, raw):
        gold = Path(record.gold_sources[0])
        assert gold.is_absolute() and gold.parent == corpus.root
        assert gold.read_text().strip() == item["knowledge"].strip()
    counts = Counter(r.gold_sources for r in records)
    assert sorted(counts.values())[-2:] == [1, 2]  # exactly one file is the gold of two questions
    # A second build rewrites nothing; a limit takes the first records and only their passages.
    before = {f: f.stat().st_mtime_ns for f in corpus.files}
    assert build(tmp_path / "corpus").files == corpus.files
    assert {f: f.stat().st_mtime_ns for f in corpus.files} == before
    few, build_few = halueval(path, limit=10)
    assert [r.id for r in few] == [r.id for r in records[:10]]
    assert len(build_few(tmp_path / "few").files) == 10


def test_tuxpaint_adapter(shared, tmp_path):
    folder = shared / "tuxpaint"
    records, build = tuxpaint(folder)
    assert len(records) == 200
    peacock = next(r for r in records if r.id == "tuxpaint-0002_peacock")
    assert peacock.prompt == "A peacock (a male peafowl)." and peacock.gold_images == ("images/0002_peacock.png",)
    assert peacock.gold_sources == () and peacock.tags == ("tuxpaint", "animals/birds")
    corpus = build(tmp_path)
    assert corpus.root == folder.resolve() and len(corpus.files) == 200
    # The corpus is the images alone: no caption file beside any of them, so captions never reach the corpus.
    assert all(f.suffix == ".png" and not f.with_suffix(".txt").exists() for f in corpus.files)
    resolved = resolve_gold(records, corpus.root)
    assert {r.gold_images[0] for r in resolved} == {str(f) for f in corpus.files}
    assert len(tuxpaint(folder, limit=5)[0]) == 5
    with pytest.raises(BadInputError, match="has no captions.jsonl"):
        tuxpaint(tmp_path)


def test_generic_jsonl(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "q1", "prompt": "When?", "gold_answer": "1964", "gold_sources": ["docs/a.md"],
                    "tags": ["cars"]}),
        "# a comment",
        "",
        json.dumps({"prompt": "Which picture?", "gold_images": "img/car.png"}),
    ]) + "\n")
    records = load_jsonl(path)
    assert records == [
        EvalRecord(id="q1", prompt="When?", gold_answer="1964", gold_sources=("docs/a.md",), tags=("cars",)),
        EvalRecord(id="line-4", prompt="Which picture?", gold_images=("img/car.png",)),
    ]
    assert resolve_gold(records, tmp_path)[0].gold_sources == (str(tmp_path.resolve() / "docs" / "a.md"),)
    assert len(load_jsonl(path, limit=1)) == 1
    for line, message in [('{"prompt": "x", "gold_source": ["a"]}', "unknown keys \\['gold_source'\\]"),
                          ('{"gold_sources": ["a"]}', "'prompt' must be a non-empty string"),
                          ('{"prompt": "x"', "set.jsonl:1: not valid JSON"),
                          ('["prompt"]', "expected a JSON object"),
                          ('{"prompt": "x", "gold_images": [1]}', "'gold_images' must be a list of non-empty")]:
        path.write_text(line + "\n")
        with pytest.raises(BadInputError, match=message):
            load_jsonl(path)
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(BadInputError, match="duplicate id 'a'"):
        load_jsonl(path)


# -- run_retrieval_eval -------------------------------------------------------------------------------------------

METRIC_KEYS = {"n", "recall@1", "recall@5", "recall@10", "mrr", "ndcg@5", "ndcg@10", "latency_ms"}


@pytest.fixture(scope="module")
def halueval_kb(tmp_path_factory, shared, text_embedder):
    """40 HaluEval questions and their passages ingested into milvus-lite (real MiniLM, no CLIP)."""
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    root = tmp_path_factory.mktemp("eval-halueval")
    records, build = halueval(shared / "halueval" / "qa_dev.jsonl", limit=40)
    corpus = build(root / "corpus")
    settings = load_settings(data_dir=root / "data", milvus={"collection": "eval_halueval"})
    runtime = Runtime(settings, ModelSet(settings, text_embedder=text_embedder, clip=None))
    report = runtime.ingestor.ingest(list(corpus.files))
    assert report.added == 40 and not report.failed
    yield runtime, resolve_gold(records, corpus.root)
    runtime.close()


def test_run_retrieval_eval_on_halueval(halueval_kb):
    from eval.retrieval import run_retrieval_eval

    runtime, records = halueval_kb
    report = run_retrieval_eval(runtime, records, progress=False)
    assert set(report) == {"config", "modes", "skipped", "examples"}
    assert report["skipped"] == {"hybrid+rerank": "no reranker configured (models.reranker)"}
    assert list(report["modes"]) == ["dense", "bm25", "hybrid"]
    for data in report["modes"].values():
        assert set(data) == METRIC_KEYS and data["n"] == 40
        assert all(0.0 <= data[key] <= 1.0 for key in METRIC_KEYS - {"n", "latency_ms"})
        assert data["recall@1"] <= data["recall@5"] <= data["recall@10"]
        assert 0 < data["latency_ms"]["p50"] <= data["latency_ms"]["p95"]
    assert report["modes"]["hybrid"]["recall@5"] >= 0.95 and report["modes"]["hybrid"]["mrr"] >= 0.9
    assert report["config"]["records"] == 40 and report["config"]["chunks"] >= 40
    assert report["config"]["encoders"]["text"]["dim"] == 384 and report["config"]["encoders"]["clip"] is None
    examples = report["examples"]
    assert [e["id"] for e in examples] == [r.id for r in records]
    first = examples[0]
    assert first["gold"] == {"text": list(records[0].gold_sources)}
    for mode in ("dense", "bm25", "hybrid"):
        entry = first["modes"][mode]
        assert entry["latency_ms"] > 0 and 1 <= len(entry["text"]["retrieved"]) <= 10
        ranked = [hit["source"] for hit in entry["text"]["retrieved"]]
        assert entry["text"]["rank"] == metrics.first_gold_rank(ranked, set(records[0].gold_sources))
    # The metrics are those of the per-example ranks.
    ranks = [e["modes"]["bm25"]["text"]["rank"] for e in examples]
    assert report["modes"]["bm25"]["mrr"] == pytest.approx(
        sum(1 / r for r in ranks if r) / len(ranks), abs=1e-4)
    # A limit and a mode subset.
    small = run_retrieval_eval(runtime, records, modes=("bm25",), limit=3, k=3, progress=False)
    assert list(small["modes"]) == ["bm25"] and small["modes"]["bm25"]["n"] == 3
    assert {"recall@3", "ndcg@3"} <= set(small["modes"]["bm25"]) and len(small["examples"]) == 3


def test_run_retrieval_eval_input_errors(halueval_kb):
    from eval.retrieval import run_retrieval_eval

    runtime, records = halueval_kb
    with pytest.raises(BadInputError, match="unknown retrieval mode"):
        run_retrieval_eval(runtime, records, modes=("sparse",), progress=False)
    with pytest.raises(BadInputError, match="has no gold sources or gold images"):
        run_retrieval_eval(runtime, [EvalRecord(id="x", prompt="q")], progress=False)
    with pytest.raises(BadInputError, match="gold paths must be absolute"):
        run_retrieval_eval(runtime, [EvalRecord(id="x", prompt="q", gold_sources=("a.txt",))], progress=False)
    with pytest.raises(BadInputError, match="none of the modes"):
        run_retrieval_eval(runtime, records, modes=("hybrid+rerank",), progress=False)


def test_hybrid_rerank_mode_with_a_cross_encoder(halueval_kb, tiny_cross_encoder, text_embedder):
    """The mode runs when a reranker is configured (random weights: the figures mean nothing)."""
    from eval.retrieval import run_retrieval_eval
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    runtime, records = halueval_kb
    with Runtime(runtime.settings, ModelSet(runtime.settings, text_embedder=text_embedder, clip=None,
                                            reranker=tiny_cross_encoder)) as reranking:
        report = run_retrieval_eval(reranking, records, modes=("hybrid", "hybrid+rerank"), limit=5, progress=False)
    assert report["skipped"] == {} and report["config"]["encoders"]["reranker"] == "CrossEncoder"
    assert set(report["modes"]["hybrid+rerank"]) == METRIC_KEYS and report["modes"]["hybrid+rerank"]["n"] == 5
    # The same pool, reordered by the cross-encoder: its scores are probabilities.
    scores = [h["score"] for h in report["examples"][0]["modes"]["hybrid+rerank"]["text"]["retrieved"]]
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_run_retrieval_eval_on_tuxpaint_images(shared, make_runtime, tmp_path):
    """Caption -> image over 30 stamps without CLIP: images are found through their file-name context only."""
    from eval.retrieval import run_retrieval_eval

    records, build = tuxpaint(shared / "tuxpaint", limit=30)
    corpus = build(tmp_path)
    runtime = make_runtime(clip=False)
    report = runtime.ingestor.ingest(list(corpus.files))
    assert report.chunks == {"text": 0, "image": 30} and not report.failed
    result = run_retrieval_eval(runtime, resolve_gold(records, corpus.root), modes=("dense", "bm25", "hybrid"),
                                progress=False)
    for data in result["modes"].values():
        assert set(data) == METRIC_KEYS and data["n"] == 30
    example = result["examples"][2]
    assert example["id"] == "tuxpaint-0002_peacock" and set(example["modes"]["hybrid"]) == {"latency_ms", "image"}
    # "A peacock (a male peafowl)." finds the image whose context is its file name, "peacock".
    assert example["modes"]["hybrid"]["image"]["rank"] == 1
    assert result["modes"]["hybrid"]["recall@10"] >= 0.7


# -- the CLI ------------------------------------------------------------------------------------------------------


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "mmrag.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)


def test_cli_eval_halueval(shared, tmp_path):
    qa = str(shared / "halueval" / "qa_dev.jsonl")
    run = _cli(["eval", "halueval", "--retrieval-only", "--corpus", qa, "--limit", "30", "--out",
                str(tmp_path / "out"), "--json"], tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["report"] == str((tmp_path / "out" / "report.json").resolve())
    assert "examples" not in summary and summary["skipped"] == {"hybrid+rerank": "no reranker configured "
                                                                                 "(models.reranker)"}
    assert summary["corpus"]["files"] == 30 and summary["corpus"]["added"] == 30
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dataset"]["name"] == "halueval" and report["dataset"]["records"] == 30
    assert report["config"]["knowledge_base"] == "eval_halueval" and report["config"]["retrieval_only"] is True
    # Its own knowledge base under <data dir>/eval/halueval, never the user's.
    assert report["config"]["milvus_uri"] == str(tmp_path / "data" / "eval" / "halueval" / "milvus.db")
    assert not (tmp_path / "data" / "milvus.db").exists()
    assert list(report["modes"]) == ["dense", "bm25", "hybrid"] and len(report["examples"]) == 30
    assert report["modes"]["hybrid"]["recall@5"] >= 0.95
    assert all(not math.isnan(report["modes"][m]["mrr"]) for m in report["modes"])
    # A second, smaller run reuses the knowledge base and removes what is not in its corpus; the table form.
    again = _cli(["eval", "halueval", "--retrieval-only", "--corpus", qa, "--limit", "10"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "retrieval on halueval (10 prompts" in again.stdout and "hybrid+rerank skipped" in again.stdout
    reports = list((tmp_path / "mmrag-eval").glob("halueval-*/report.json"))
    assert len(reports) == 1
    second = json.loads(reports[0].read_text())
    assert second["corpus"]["unchanged"] == 10 and second["corpus"]["removed_stale"] == 20
    assert second["config"]["chunks"] == second["corpus"]["chunks"]["text"] == 10


def test_cli_eval_errors(tmp_path):
    not_a_file = _cli(["eval", "halueval", "--corpus", "x.jsonl"], tmp_path)
    assert not_a_file.returncode == 5 and "is not a file" in not_a_file.stderr
    no_corpus = _cli(["eval", "halueval", "--retrieval-only"], tmp_path)
    assert no_corpus.returncode == 5 and "halueval needs --corpus PATH" in no_corpus.stderr
    no_folder = _cli(["eval", "tuxpaint", "--retrieval-only", "--corpus", str(tmp_path / "nope")], tmp_path)
    assert no_folder.returncode == 5 and "is not a folder" in no_folder.stderr
    unknown = _cli(["eval", "squad", "--retrieval-only"], tmp_path)
    assert unknown.returncode == 5 and "unknown dataset 'squad'" in unknown.stderr
    # A JSONL set whose gold names a file the corpus lacks fails before anything is ingested.
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "a.md").write_text("# A\n\nSome text.\n")
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "q", "gold_sources": ["b.md"]}) + "\n")
    typo = _cli(["eval", str(tmp_path / "set.jsonl"), "--retrieval-only", "--corpus", str(tmp_path / "kb")], tmp_path)
    assert typo.returncode == 5 and "1 gold file(s) do not exist" in typo.stderr and "b.md" in typo.stderr
    assert not (tmp_path / "data" / "eval" / "set" / "milvus.db").exists()
