"""``retrieve(query) -> Grounding``: the passages and reference images that should ground a generation.

Steps, for a query holding text and/or an image:
  1. check the query (empty, too long, unreadable image, filter syntax) and compile its filter;
  2. text passages: dense (text embedder) and BM25 (Milvus' sparse BM25 field) fused: RRF (the default) over one
     search per signal, fused here; weighted fusion by Milvus ``hybrid_search``; an image query adds CLIP
     image->text;
  3. reference images: CLIP text->image (and image->image for an image query) fused with dense and BM25 matches on
     the image's context text, so images stay findable when no CLIP weights are present;
  4. per-signal scores for every hit (dense cosine, BM25, CLIP cosine) next to the fused score;
  5. passages re-scored by the cross-encoder when one is configured;
  6. near-duplicates dropped and the rest diversified (MMR on the passages' vectors);
  7. ``grounded`` says whether anything passed the relevance threshold, so generation can abstain.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mmrag.errors import BadInputError, ModelUnavailableError
from mmrag.index import CHUNK_FIELDS, quote
from mmrag.records import Chunk, Grounding, Hit
from mmrag.runtime import Runtime
from retrieval.filters import compile_filter

logger = logging.getLogger(__name__)

Mode = Literal["hybrid", "dense", "bm25"]
TEXT_MODALITIES = '["text", "table"]'


@dataclass(frozen=True)
class Query:
    text: str | None = None
    image: bytes | None = None  # encoded image bytes (PNG, JPEG, ...)
    k_text: int | None = None  # None: the profile's retrieval.k_text
    k_image: int | None = None
    filter: str | None = None  # see retrieval.filters
    threshold: float | None = None  # None: the profile's retrieval.threshold
    tenant: str | None = None  # None: the settings' tenant
    mode: Mode = "hybrid"  # dense-only and BM25-only exist for evaluation
    rerank: bool | None = None  # None: rerank when a reranker is configured


@dataclass
class _Candidate:
    row: dict[str, Any]
    fused: float
    scores: dict[str, float]


def _cos(a: np.ndarray, b: list[float] | np.ndarray) -> float:
    return float(np.dot(a, np.asarray(b, dtype=np.float32)))


class Retriever:
    """Retrieval over one runtime's knowledge base and models."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings.retrieval

    # -- the call ---------------------------------------------------------------------------------------------
    def retrieve(self, query: Query) -> Grounding:
        # 1. Check inputs.
        text, k_text, k_image, base = self._check(query)
        index = self.runtime.index
        schema = index.schema()
        if schema is None:
            return Grounding(prompt=text or "", grounded=False)
        has_clip = bool(schema.get("clip"))
        models = self.runtime.models
        clip = models.clip if has_clip else None
        if has_clip and clip is not None:
            index.ensure(models.text_embedder.signature, clip.signature)
        if query.image is not None and clip is None:
            raise ModelUnavailableError("image queries need CLIP weights, and none are loaded for this knowledge "
                                        "base; `mmrag models` says what to configure")
        # Query vectors, computed once (CLIP's text vector only serves the images' search).
        q_text = models.text_embedder.encode([text])[0] if (text and query.mode != "bm25") else None
        q_clip_text = (clip.encode_texts([text])[0]
                       if (text and clip is not None and query.mode == "hybrid" and k_image) else None)
        q_clip_image = clip.encode_images([query.image])[0] if (query.image is not None and clip) else None
        vectors = {"dense": q_text, "clip_text": q_clip_text, "clip_image": q_clip_image}

        # 2. Passages.
        text_hits: list[Hit] = []
        if k_text:
            pool = self._search(text, vectors, query.mode, f"{base} and modality in {TEXT_MODALITIES}",
                                k_text * self.settings.candidates, images=False)
            # 5.-6. Rerank, then de-duplicate and diversify.
            reranked = self._rerank(text, pool, query.rerank)
            text_hits = [self._hit(c, key) for c, key in self._mmr(reranked, k_text)]
        # 3. Images.
        image_hits: list[Hit] = []
        if k_image:
            pool = self._search(text, vectors, query.mode, f'{base} and modality == "image"',
                                k_image * self.settings.candidates, images=True)
            image_hits = [self._hit(c, "fused") for c in pool[:k_image]]
        # 7. Did anything pass the threshold?
        grounded = self._grounded(text_hits, image_hits, query.threshold)
        return Grounding(prompt=text or "", text_hits=tuple(text_hits), image_hits=tuple(image_hits),
                         grounded=grounded)

    # -- 1. checks --------------------------------------------------------------------------------------------
    def _check(self, query: Query) -> tuple[str | None, int, int, str]:
        text = query.text.strip() if query.text else None
        if not text and query.image is None:
            raise BadInputError("empty query: give text, an image, or both")
        if text and len(text) > self.settings.max_query_chars:
            raise BadInputError(f"query is {len(text):,} characters; the limit is {self.settings.max_query_chars:,} "
                                "(retrieval.max_query_chars)")
        if query.image is not None:
            self._check_image(query.image)
        k_text = self.settings.k_text if query.k_text is None else query.k_text
        k_image = self.settings.k_image if query.k_image is None else query.k_image
        for name, k in (("k_text", k_text), ("k_image", k_image)):
            if not 0 <= k <= self.settings.max_k:
                raise BadInputError(f"{name} must be between 0 and {self.settings.max_k}, got {k}")
        if query.mode not in ("hybrid", "dense", "bm25"):
            raise BadInputError(f"unknown retrieval mode {query.mode!r}: use hybrid, dense or bm25")
        if query.mode == "bm25" and not text:
            raise BadInputError("BM25 retrieval needs query text")
        tenant = query.tenant or self.runtime.settings.tenant
        base = f"tenant == {quote(tenant)}"
        user = compile_filter(query.filter)
        if user:
            base = f"{base} and {user}"
        return text, k_text, k_image, base

    def _check_image(self, data: bytes) -> None:
        from ingest.safety import check_image

        if len(data) > self.settings.max_query_image_bytes:
            raise BadInputError(f"query image is {len(data):,} bytes; the limit is "
                                f"{self.settings.max_query_image_bytes:,}")
        check_image(data, self.runtime.settings.ingest.max_image_pixels, what="query image")

    # -- 2.-4. search -----------------------------------------------------------------------------------------
    def _requests(self, text: str | None, vectors: dict[str, Any], mode: Mode, expr: str, limit: int,
                  images: bool) -> list[tuple[str, Any]]:
        from pymilvus import AnnSearchRequest

        reqs: list[tuple[str, Any]] = []
        if mode in ("hybrid", "dense") and vectors["dense"] is not None:
            reqs.append(("dense", AnnSearchRequest([vectors["dense"].tolist()], "text_vector",
                                                   {"metric_type": "COSINE"}, limit, expr=expr)))
        if mode in ("hybrid", "bm25") and text:
            reqs.append(("bm25", AnnSearchRequest([text], "sparse", {"metric_type": "BM25"}, limit, expr=expr)))
        if mode == "hybrid" or not text:
            if images and vectors["clip_text"] is not None:
                reqs.append(("clip", AnnSearchRequest([vectors["clip_text"].tolist()], "clip_vector",
                                                      {"metric_type": "COSINE"}, limit, expr=expr)))
            if vectors["clip_image"] is not None:
                reqs.append(("clip_image", AnnSearchRequest([vectors["clip_image"].tolist()], "clip_vector",
                                                            {"metric_type": "COSINE"}, limit, expr=expr)))
        return reqs

    def _search(self, text: str | None, vectors: dict[str, Any], mode: Mode, expr: str, limit: int,
                images: bool) -> list[_Candidate]:
        from pymilvus import RRFRanker, WeightedRanker

        index = self.runtime.index
        reqs = self._requests(text, vectors, mode, expr, limit, images)
        if not reqs:
            return []
        fields = CHUNK_FIELDS + ["text_vector"] + (["clip_vector"] if index.has_clip else [])
        if len(reqs) == 1:
            name, req = reqs[0]
            raw = index._call(index.client.search, index.chunks, data=req.data, anns_field=req.anns_field,
                              search_params=req.param, limit=limit, filter=expr, output_fields=fields)
        elif self.settings.fusion == "rrf":
            return self._fused_in_process(reqs, expr, limit, fields, vectors)
        else:
            if self.settings.fusion == "weighted":
                weights = [self.settings.weights.get("clip" if n.startswith("clip") else n, 0.5) for n, _ in reqs]
                ranker = WeightedRanker(*weights)
            else:
                ranker = RRFRanker(self.settings.rrf_k)
            raw = index._call(index.client.hybrid_search, index.chunks, reqs=[r for _, r in reqs], ranker=ranker,
                              limit=limit, output_fields=fields)
        hits = raw[0] if raw else []
        # One signal alone: its own score is the fused one (BM25 made positive, see _signal_scores).
        sign = abs if len(reqs) == 1 and reqs[0][0] == "bm25" else float
        candidates = [_Candidate(h["entity"] | {"id": h.get("id", h["entity"].get("id"))}, sign(float(h["distance"])),
                                 {}) for h in hits]
        self._signal_scores(candidates, text, vectors, {n for n, _ in reqs}, expr)
        return candidates

    def _fused_in_process(self, reqs: list[tuple[str, Any]], expr: str, limit: int, fields: list[str],
                          vectors: dict[str, Any]) -> list[_Candidate]:
        """RRF over one plain search per signal, fused here: Milvus' ``hybrid_search`` runs the same searches and
        the same fusion (score = sum of 1 / (rrf_k + rank), ranks from 1), but returns only the fused score, and the
        BM25 score of each hit then took one more BM25 search, the costliest search there is (274 ms at 100k chunks
        in milvus-lite). Here each hit's BM25 score comes from the BM25 search that found it; a hit BM25 did not
        rank within ``limit`` scores 0 for BM25."""
        index = self.runtime.index
        fused: dict[Any, float] = {}
        rows: dict[Any, dict[str, Any]] = {}
        bm25: dict[Any, float] = {}
        k = self.settings.rrf_k
        for name, req in reqs:
            raw = index._call(index.client.search, index.chunks, data=req.data, anns_field=req.anns_field,
                              search_params=req.param, limit=limit, filter=expr, output_fields=fields)
            for rank, h in enumerate(raw[0] if raw else [], start=1):
                key = h.get("id", h["entity"].get("id"))
                rows.setdefault(key, h["entity"] | {"id": key})
                fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
                if name == "bm25":  # milvus-lite reports BM25 relevance negated, a Milvus server positive
                    bm25[key] = abs(float(h["distance"]))
        order = sorted(fused, key=fused.__getitem__, reverse=True)[:limit]  # stable: ties keep search order
        candidates = [_Candidate(rows[key], fused[key], {}) for key in order]
        used = {n for n, _ in reqs}
        self._signal_scores(candidates, None, vectors, used, expr)
        if "bm25" in used:
            for c in candidates:
                c.scores["bm25"] = bm25.get(c.row["id"], 0.0)
        return candidates

    def _signal_scores(self, candidates: list[_Candidate], text: str | None, vectors: dict[str, Any],
                       used: set[str], expr: str) -> None:
        """Fill each candidate's scores for the signals that found it: cosines from the returned vectors, BM25
        from one search restricted to the candidates."""
        for c in candidates:
            c.scores["fused"] = c.fused
            if "dense" in used:
                c.scores["dense"] = _cos(vectors["dense"], c.row["text_vector"])
            if "clip" in used:
                c.scores["clip"] = _cos(vectors["clip_text"], c.row["clip_vector"])
            if "clip_image" in used:
                c.scores["clip_image"] = _cos(vectors["clip_image"], c.row["clip_vector"])
        if text and "bm25" in used and candidates:
            index = self.runtime.index
            ids = [c.row["id"] for c in candidates]
            found = index._call(index.client.search, index.chunks, data=[text], anns_field="sparse",
                                search_params={"metric_type": "BM25"}, limit=len(ids),
                                filter=f"{expr} and id in {json_list(ids)}", output_fields=["id"])
            # milvus-lite reports BM25 relevance as a negated distance, a Milvus server as a positive score.
            bm25 = {h.get("id", h["entity"].get("id")): abs(float(h["distance"])) for h in (found[0] if found else [])}
            for c in candidates:
                c.scores["bm25"] = bm25.get(c.row["id"], 0.0)

    # -- 5. rerank --------------------------------------------------------------------------------------------
    def _rerank(self, text: str | None, pool: list[_Candidate], wanted: bool | None) -> list[tuple[_Candidate, str]]:
        reranker = self.runtime.models.reranker if (wanted is not False and text) else None
        if wanted and reranker is None and text:
            raise ModelUnavailableError("reranking was asked for but no reranker is configured (models.reranker)")
        if reranker is None or not pool:
            return [(c, "fused") for c in pool]
        logits = reranker.predict([(text, c.row["text"]) for c in pool])
        for c, logit in zip(pool, np.atleast_1d(logits)):
            c.scores["rerank"] = 1.0 / (1.0 + math.exp(-float(logit)))
        return [(c, "rerank") for c in sorted(pool, key=lambda c: c.scores["rerank"], reverse=True)]

    # -- 6. MMR -----------------------------------------------------------------------------------------------
    def _mmr(self, ranked: list[tuple[_Candidate, str]], k: int) -> list[tuple[_Candidate, str]]:
        if not ranked:
            return []
        lam = self.settings.mmr_lambda
        relevance = np.array([c.scores[key] for c, key in ranked], dtype=np.float32)
        span = float(relevance.max() - relevance.min())
        relevance = (relevance - relevance.min()) / span if span > 0 else np.ones_like(relevance)
        vectors = np.array([c.row["text_vector"] for c, _ in ranked], dtype=np.float32)
        chosen: list[int] = []
        remaining = list(range(len(ranked)))
        while remaining and len(chosen) < k:
            if chosen:
                similarity = (vectors[remaining] @ vectors[chosen].T).max(axis=1)
            else:
                similarity = np.zeros(len(remaining), dtype=np.float32)
            keep = [i for i, s in zip(remaining, similarity) if s < self.settings.duplicate_cosine]
            if not keep:
                break
            similarity = similarity[[remaining.index(i) for i in keep]]
            scores = lam * relevance[keep] - (1.0 - lam) * similarity
            best = keep[int(np.argmax(scores))]
            chosen.append(best)
            remaining = [i for i in keep if i != best]
        return [ranked[i] for i in chosen]

    # -- 7. threshold -----------------------------------------------------------------------------------------
    def _grounded(self, text_hits: list[Hit], image_hits: list[Hit], threshold: float | None) -> bool:
        limit = self.settings.threshold if threshold is None else threshold
        for hit in text_hits:
            if "rerank" in hit.scores:
                if hit.scores["rerank"] >= self.settings.rerank_threshold:
                    return True
            elif hit.scores.get("dense", -1.0) >= limit:
                return True
        return any(hit.scores.get("dense", -1.0) >= limit for hit in image_hits)

    # -- records ----------------------------------------------------------------------------------------------
    @staticmethod
    def _hit(candidate: _Candidate, key: str) -> Hit:
        row = candidate.row
        meta = dict(row.get("meta") or {})
        bbox = meta.get("bbox")
        image = row["modality"] == "image"
        chunk = Chunk(id=row["id"], doc_id=row["doc_id"], modality=row["modality"],
                      text="" if image else row["text"], blob=row.get("blob", ""),
                      page=None if row.get("page", -1) < 0 else row["page"],
                      bbox=tuple(bbox) if bbox else None, order=row.get("position", 0),
                      context=row["text"] if image else "", metadata=meta)
        scores = {name: round(value, 6) for name, value in candidate.scores.items()}
        return Hit(chunk=chunk, score=round(candidate.scores[key], 6), scores=scores, source=row.get("source", ""))


def json_list(values: list[str]) -> str:
    return "[" + ", ".join(quote(v) for v in values) + "]"


def retrieve(runtime: Runtime, query: Query) -> Grounding:
    return Retriever(runtime).retrieve(query)


__all__ = ["Query", "Retriever", "retrieve"]
