"""llama-index integration: ``MmragRetriever`` is a ``BaseRetriever`` over this project's retrieval.

Drop it into any llama-index app (``RetrieverQueryEngine``, chat engines, agents): passages come back as
``TextNode``s and reference images as ``ImageNode``s (``image_path`` is the blob's path or URL, ``text`` its
context), each ``NodeWithScore`` carrying the fused score and, in its metadata, the per-signal scores, the source,
page and chunk id.

    from llama_index.core.query_engine import RetrieverQueryEngine
    engine = RetrieverQueryEngine.from_args(MmragRetriever(runtime, k_text=4), llm=my_local_llm)
"""

from __future__ import annotations

from typing import Any

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle, TextNode

from mmrag.records import Hit
from mmrag.runtime import Runtime
from retrieval.retriever import Query, Retriever


class MmragRetriever(BaseRetriever):
    def __init__(self, runtime: Runtime, *, k_text: int | None = None, k_image: int | None = 0,
                 filter: str | None = None, tenant: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runtime = runtime
        self._retriever = Retriever(runtime)
        self._k_text = k_text
        self._k_image = k_image
        self._filter = filter
        self._tenant = tenant
        self.last_grounded: bool | None = None  # whether the last query passed the relevance threshold

    def _metadata(self, hit: Hit) -> dict[str, Any]:
        meta: dict[str, Any] = {"chunk_id": hit.chunk.id, "doc_id": hit.chunk.doc_id, "source": hit.source,
                                "modality": hit.chunk.modality, "scores": dict(hit.scores)}
        if hit.chunk.page is not None:
            meta["page"] = hit.chunk.page
        return meta

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        grounding = self._retriever.retrieve(Query(text=query_bundle.query_str, k_text=self._k_text,
                                                   k_image=self._k_image, filter=self._filter, tenant=self._tenant))
        self.last_grounded = grounding.grounded
        nodes: list[NodeWithScore] = []
        for hit in grounding.text_hits:
            node = TextNode(id_=hit.chunk.id, text=hit.chunk.text, metadata=self._metadata(hit),
                            excluded_llm_metadata_keys=["chunk_id", "doc_id", "scores", "modality"])
            nodes.append(NodeWithScore(node=node, score=hit.score))
        for hit in grounding.image_hits:
            node = ImageNode(id_=hit.chunk.id, text=hit.chunk.context,
                             image_path=self._runtime.blobs.url_of(hit.chunk.blob), metadata=self._metadata(hit),
                             excluded_llm_metadata_keys=["chunk_id", "doc_id", "scores", "modality"])
            nodes.append(NodeWithScore(node=node, score=hit.score))
        return nodes
