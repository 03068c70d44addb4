"""Retrieval on real milvus-lite with the real MiniLM: every query kind, filter kind, threshold and abstention
signal, the cross-encoder path (a tiny random CrossEncoder), tenants, duplicates, the CLI and the error cases."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag.errors import BadInputError, ModelUnavailableError
from retrieval.retriever import Query, Retriever

SAMPLE_KB = Path(__file__).resolve().parents[1] / "mmrag" / "sample_kb"
MUSTANG = "When was the Ford Mustang introduced?"


def _runtime(root: Path, text_embedder, clip, reranker=None, **overrides):
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    overrides.setdefault("ingest", {"exclude": [".*", "images/*", "LICENSE.md"]})
    settings = load_settings(data_dir=root, **overrides)
    return Runtime(settings, ModelSet(settings, text_embedder=text_embedder, clip=clip, reranker=reranker))


@pytest.fixture(scope="module")
def kb(tmp_path_factory, text_embedder, tiny_clip):
    """The sample knowledge base (Markdown + HTML with five pictures), ingested once for the module, plus a
    copy of its notes page in another tenant and a duplicate of the guide."""
    root = tmp_path_factory.mktemp("retrieval")
    corpus = root / "corpus"
    shutil.copytree(SAMPLE_KB, corpus)
    shutil.copy(corpus / "vintage-cars-1960s.md", corpus / "copy-of-vintage-cars.md")
    runtime = _runtime(root / "data", text_embedder, tiny_clip)
    report = runtime.ingestor.ingest([corpus])
    assert report.failed == () and report.added == 3
    other = root / "other"
    other.mkdir()
    (other / "secret.txt").write_text("The Ford Mustang prototype was tested in secret in 1962 by tenant two.")
    runtime.ingestor.ingest([other], tenant="two")
    yield runtime
    runtime.close()


def retrieve(runtime, **kwargs):
    return Retriever(runtime).retrieve(Query(**kwargs))


def test_text_query_finds_the_passage_and_the_picture(kb):
    grounding = retrieve(kb, text=MUSTANG, k_text=3, k_image=2)
    assert grounding.grounded
    top = grounding.text_hits[0]
    assert "17 April 1964" in top.chunk.text and top.source.endswith(".md")
    assert set(top.scores) == {"fused", "dense", "bm25"}
    assert top.score == top.scores["fused"]
    # The per-signal dense score is the cosine between the query and the passage.
    q = kb.models.text_embedder.encode([MUSTANG])[0]
    p = kb.models.text_embedder.encode([top.chunk.text])[0]
    assert top.scores["dense"] == pytest.approx(float(q @ p), abs=1e-3)
    assert top.scores["bm25"] > 0
    image = grounding.image_hits[0]
    assert image.chunk.modality == "image" and "Mustang" in image.chunk.context
    assert {"fused", "dense", "bm25", "clip"} <= set(image.scores)
    assert kb.blobs.exists(image.chunk.blob)


def test_modes_use_only_their_signal(kb):
    dense = retrieve(kb, text=MUSTANG, k_text=2, k_image=0, mode="dense")
    assert "bm25" not in dense.text_hits[0].scores and "17 April 1964" in dense.text_hits[0].chunk.text
    bm25 = retrieve(kb, text=MUSTANG, k_text=2, k_image=0, mode="bm25")
    assert "dense" not in bm25.text_hits[0].scores and bm25.text_hits[0].scores["bm25"] > 0
    assert "Mustang" in bm25.text_hits[0].chunk.text


def test_bm25_ignores_english_stop_words(kb, tmp_path, text_embedder):
    """BM25 drops English stop words (they match nearly every passage and cost milvus-lite a walk over each one's
    whole posting list): a query of stop words alone finds nothing by BM25, and adding one to a query leaves its
    BM25 scores as they were. The analyzer is part of the collection, so a Milvus server applies the same words."""
    from mmrag.index import BM25_ANALYZER

    assert retrieve(kb, text="The and of was", k_text=3, k_image=0, mode="bm25").text_hits == ()
    plain = retrieve(kb, text="Mustang prototype", k_text=3, k_image=0, mode="bm25").text_hits
    padded = retrieve(kb, text="the Mustang and the prototype of it", k_text=3, k_image=0, mode="bm25").text_hits
    assert plain and [h.chunk.id for h in padded] == [h.chunk.id for h in plain]
    assert [h.scores["bm25"] for h in padded] == pytest.approx([h.scores["bm25"] for h in plain])
    fields = kb.index.client.describe_collection(kb.index.chunks)["fields"]
    params = next(f for f in fields if f["name"] == "text")["params"]
    analyzer = params["analyzer_params"]
    assert (json.loads(analyzer) if isinstance(analyzer, str) else analyzer) == BM25_ANALYZER
    # milvus.bm25_stop_words = false: Milvus' default analyzer, stop words searched like any other word.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "note.txt").write_text("The Ford Mustang was introduced in April 1964.")
    default = _runtime(tmp_path / "data", text_embedder, None, milvus={"bm25_stop_words": False})
    try:
        default.ingestor.ingest([corpus])
        hits = retrieve(default, text="The and of was", k_text=3, k_image=0, mode="bm25").text_hits
        assert [h.chunk.text for h in hits] == ["The Ford Mustang was introduced in April 1964."]
    finally:
        default.close()


def test_duplicates_are_dropped(kb):
    hits = retrieve(kb, text=MUSTANG, k_text=4, k_image=0).text_hits
    texts = [h.chunk.text for h in hits]
    assert len(texts) == len(set(texts))  # the copied guide's identical passage is not returned twice


@pytest.mark.parametrize("expr, check", [
    ('modality == "table"', lambda hits: hits == ()),
    ('source like "*.html"', lambda hits: hits and all(h.source.endswith(".html") for h in hits)),
    ('source like "*.html" or source like "*copy-of*"', lambda hits: hits and all(
        h.source.endswith(".html") or "copy-of" in h.source for h in hits)),
    ('meta.title == "Paint"', lambda hits: [h.chunk.metadata["title"] for h in hits] == ["Paint"]),
    ('not (meta.title in ["Paint", "Tyres and wheels"])', lambda hits: hits and all(
        h.chunk.metadata.get("title") not in ("Paint", "Tyres and wheels") for h in hits)),
    ('page >= 1', lambda hits: hits == ()),  # Markdown and HTML have no pages
])
def test_filters(kb, expr, check):
    assert check(retrieve(kb, text="paint and chrome of old cars", k_text=5, k_image=0, filter=expr).text_hits)


def test_tenants_never_see_each_other(kb):
    default = retrieve(kb, text="Mustang prototype tested in secret", k_text=10, k_image=0)
    assert all("tenant two" not in h.chunk.text for h in default.text_hits)
    two = retrieve(kb, text="Mustang prototype tested in secret", k_text=10, k_image=5, tenant="two")
    assert [h.chunk.text for h in two.text_hits] == [
        "The Ford Mustang prototype was tested in secret in 1962 by tenant two."]
    assert two.image_hits == ()


def test_threshold_decides_grounded(kb):
    unrelated = retrieve(kb, text="lattice quantum chromodynamics of gluons", k_text=3, k_image=2)
    assert not unrelated.grounded and unrelated.text_hits  # hits are shown, but nothing passed
    assert max(h.scores["dense"] for h in unrelated.text_hits) < 0.35
    assert retrieve(kb, text="lattice quantum chromodynamics of gluons", threshold=-1.0).grounded
    assert not retrieve(kb, text=MUSTANG, threshold=0.99).grounded
    none = retrieve(kb, text=MUSTANG, k_text=0, k_image=0)
    assert none.text_hits == () and none.image_hits == () and not none.grounded


def test_image_query_finds_the_same_picture_and_passages(kb):
    picture = (SAMPLE_KB / "images" / "jaguar-e-type-1961.png").read_bytes()
    grounding = retrieve(kb, image=picture, k_text=2, k_image=2)
    top = grounding.image_hits[0]
    assert "Jaguar" in top.chunk.context
    assert top.scores["clip_image"] == pytest.approx(1.0, abs=1e-3)  # image -> image
    assert len(grounding.text_hits) == 2 and all("clip_image" in h.scores for h in grounding.text_hits)
    both = retrieve(kb, text="a green roadster", image=picture, k_text=1, k_image=1)
    assert {"dense", "bm25", "clip", "clip_image"} <= set(both.image_hits[0].scores)


def test_knowledge_base_without_clip(tmp_path, text_embedder):
    runtime = _runtime(tmp_path / "data", text_embedder, None)
    runtime.ingestor.ingest([SAMPLE_KB])
    grounding = retrieve(runtime, text="a green sports car", k_text=1, k_image=1)
    assert "green" in grounding.image_hits[0].chunk.context  # found through its context text
    assert "clip" not in grounding.image_hits[0].scores
    picture = (SAMPLE_KB / "images" / "mini-1959.png").read_bytes()
    with pytest.raises(ModelUnavailableError, match="image queries need CLIP"):
        retrieve(runtime, image=picture)
    runtime.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"text": "   "}, "empty query"),
    ({}, "empty query"),
    ({"text": "x" * 5000}, "the limit is 4,000"),
    ({"text": "ok", "k_text": 1000}, "k_text must be between 0 and 100"),
    ({"text": "ok", "image": b"not an image"}, "query image"),
    ({"text": "ok", "filter": "colour == 'red'"}, "unknown filter field 'colour'"),
    ({"text": "ok", "filter": "page >= "}, "malformed filter"),
    ({"text": "ok", "filter": "page > 1 page"}, "malformed filter: unexpected 'page'"),
    ({"text": "ok", "filter": 'page == "one"'}, "is a number"),
    ({"text": "ok", "filter": 'tenant == "two"'}, "'tenant' is not allowed"),
    ({"text": "ok", "mode": "fuzzy"}, "unknown retrieval mode"),
])
def test_bad_queries_are_clear_errors(kb, kwargs, message):
    with pytest.raises(BadInputError, match=message):
        retrieve(kb, **kwargs)


def test_filter_values_cannot_inject(kb):
    from retrieval.filters import compile_filter

    sneaky = 'source == "x\\" or tenant != \\"none"'
    assert compile_filter(sneaky) == 'source == "x\\" or tenant != \\"none"'
    assert retrieve(kb, text=MUSTANG, filter=sneaky).text_hits == ()


def test_reranker_rescores_passages(kb, tiny_cross_encoder, text_embedder, tiny_clip):
    runtime = _runtime(Path(kb.settings.data_dir), text_embedder, tiny_clip, reranker=tiny_cross_encoder)
    runtime.index._client = kb.index.client  # one embedded store per process: share the open connection
    grounding = retrieve(runtime, text=MUSTANG, k_text=4, k_image=0)
    reranks = [h.scores["rerank"] for h in grounding.text_hits]
    assert all(0.0 <= r <= 1.0 for r in reranks)
    assert all(h.score == h.scores["rerank"] for h in grounding.text_hits)
    pairs = [(MUSTANG, h.chunk.text) for h in grounding.text_hits]
    logits = np.atleast_1d(tiny_cross_encoder.predict(pairs))
    assert reranks == pytest.approx((1 / (1 + np.exp(-logits))).tolist(), abs=1e-4)
    # With a reranker, "grounded" follows its probability against retrieval.rerank_threshold.
    assert grounding.grounded == (max(reranks) >= runtime.settings.retrieval.rerank_threshold)
    plain = retrieve(runtime, text=MUSTANG, k_text=4, k_image=0, rerank=False)
    assert "rerank" not in plain.text_hits[0].scores
    with pytest.raises(ModelUnavailableError, match="no reranker is configured"):
        retrieve(kb, text=MUSTANG, rerank=True)


def test_cli_search_json(tmp_path):
    env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "data")}
    cli = [sys.executable, "-m", "mmrag.cli"]
    demo = subprocess.run(cli + ["demo", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr
    demo = json.loads(demo.stdout)  # the README's main job: ingest the sample knowledge base, ground a prompt
    assert demo["ingest"]["added"] == 2 and demo["stats"]["chunks"]["image"] == 5
    assert demo["grounding"]["grounded"] and "17 April 1964" in demo["grounding"]["text"][0]["text"]
    assert "Mustang" in demo["grounding"]["images"][0]["context"]
    run = subprocess.run(cli + ["search", MUSTANG, "--k-text", "2", "--k-image", "1", "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) == {"text", "images", "grounded"} and result["grounded"] is True
    assert set(result["text"][0]) == {"id", "doc_id", "source", "page", "score", "scores", "text"}
    assert set(result["images"][0]) == {"id", "doc_id", "source", "page", "score", "scores", "context", "blob"}
    assert "17 April 1964" in result["text"][0]["text"] and Path(result["images"][0]["blob"]).is_file()
    table = subprocess.run(cli + ["search", "quantum chromodynamics", "--k-image", "0"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert "nothing passed the relevance threshold" in table.stdout
    bad = subprocess.run(cli + ["search", "x", "--filter", "colour == 1"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 5 and bad.stderr.startswith("error: unknown filter field 'colour'")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    (tmp_path / "q.png").write_bytes(buf.getvalue())
    noclip = subprocess.run(cli + ["search", "--image", str(tmp_path / "q.png")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert noclip.returncode == 4 and "image queries need CLIP" in noclip.stderr
