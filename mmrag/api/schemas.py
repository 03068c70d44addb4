"""Pydantic models at the HTTP boundary (and only there): requests, responses, OpenAPI examples."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Response):
    code: str = Field(description="Stable machine-readable code, e.g. not_found, too_many_generations")
    message: str = Field(description="What went wrong and what to do")

    model_config = ConfigDict(json_schema_extra={"examples": [{"code": "not_found",
                                                               "message": "no document with that id"}]})


class Health(_Response):
    status: str = Field(examples=["ok"])


class Ready(_Response):
    ready: bool
    status: str = Field(examples=["ready", "loading", "failed", "store_unavailable"])
    detail: str | None = None
    models: dict[str, str | None] = Field(default_factory=dict)
    auth: bool = Field(default=True, description="Whether /v1 calls need an API key")


# -- documents ---------------------------------------------------------------------------------------------------
class PathsRequest(_Request):
    paths: list[str] = Field(min_length=1, max_length=1000,
                             description="Files or folders on the server, inside api.server_root")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"paths": ["manuals/mustang.pdf"]}]})


class FailureOut(_Response):
    source: str
    reason: str


class UploadedDoc(_Response):
    name: str
    doc_id: str


class IngestReportOut(_Response):
    added: int
    updated: int
    unchanged: int
    deleted: int
    failed: list[FailureOut]
    chunks: dict[str, int]
    documents: list[UploadedDoc] = Field(default_factory=list,
                                         description="The document ids of the files given (uploaded or named)")

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "added": 1, "updated": 0, "unchanged": 0, "deleted": 0, "failed": [], "chunks": {"text": 4, "image": 1},
        "documents": [{"name": "mustang.md", "doc_id": "4f1c0a3b9d2e8f7a6b5c4d3e2f1a0b9c"}]}]})


class DocumentOut(_Response):
    doc_id: str
    source: str
    name: str
    version: str
    mime: str
    chunks: dict[str, int]
    meta: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "doc_id": "4f1c0a3b9d2e8f7a6b5c4d3e2f1a0b9c", "source": "/data/uploads/acme-1a2b3c4d5e6f/mustang.md",
        "name": "mustang.md", "version": "9b74c9897bac770ffc029102a200c5de...", "mime": "text/markdown",
        "chunks": {"text": 4, "image": 1}, "meta": {"name": "mustang.md", "bytes": 2311}}]})


class DocumentList(_Response):
    documents: list[DocumentOut]


class Deleted(_Response):
    deleted: str


# -- search ------------------------------------------------------------------------------------------------------
class SearchRequest(_Request):
    text: str | None = Field(default=None, max_length=100_000, description="Query text (may be empty with image)")
    image: str | None = Field(default=None, max_length=64 * 1024 * 1024,
                              description="A query image, base64-encoded (PNG, JPEG, ...)")
    k_text: int | None = Field(default=None, ge=0, le=10_000, description="Passages to return (<= api.max_k)")
    k_image: int | None = Field(default=None, ge=0, le=10_000, description="Reference images to return")
    filter: str | None = Field(default=None, max_length=4000, examples=['modality == "table" and page >= 3'],
                               description="Filter expression (see the README's retrieval section)")
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "When was the Ford Mustang introduced?", "k_text": 3, "k_image": 1}]})


class TextHitOut(_Response):
    id: str
    doc_id: str
    source: str
    page: int | None
    score: float
    scores: dict[str, float]
    text: str


class ImageHitOut(_Response):
    id: str
    doc_id: str
    source: str
    page: int | None
    score: float
    scores: dict[str, float]
    context: str
    blob: str = Field(description="URL of the image bytes: GET /v1/images/{id}")


class GroundingOut(_Response):
    text: list[TextHitOut]
    images: list[ImageHitOut]
    grounded: bool = Field(description="False when nothing passed the relevance threshold (a generation abstains)")

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "text": [{"id": "0d1f…", "doc_id": "4f1c…", "source": "/data/uploads/acme-…/mustang.md", "page": None,
                  "score": 0.33, "scores": {"fused": 0.33, "dense": 0.71, "bm25": 5.2},
                  "text": "The Ford Mustang was introduced in April 1964."}],
        "images": [{"id": "7a2e…", "doc_id": "4f1c…", "source": "/data/uploads/acme-…/mustang.md", "page": None,
                    "score": 0.31, "scores": {"fused": 0.31, "dense": 0.52}, "context": "A red 1964 Mustang",
                    "blob": "/v1/images/7a2e…"}],
        "grounded": True}]})


# -- generate ----------------------------------------------------------------------------------------------------
class GenerateRequest(_Request):
    prompt: str = Field(min_length=1, max_length=100_000, description="The question or instruction "
                        "(<= api.max_prompt_chars characters)")
    k_text: int | None = Field(default=None, ge=0, le=10_000)
    k_image: int | None = Field(default=None, ge=0, le=10_000)
    filter: str | None = Field(default=None, max_length=4000)
    max_new_tokens: int | None = Field(default=None, ge=1, le=100_000, description="<= api.max_new_tokens")
    temperature: float | None = Field(default=None, ge=0.0, le=5.0, description="0: greedy")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[str] | None = Field(default=None, max_length=8)
    images: bool = Field(default=False, description="Also generate images guided by the reference images "
                         "(when an image generator is configured)")
    stream: bool = Field(default=False, description="Server-sent events: `token` events, then one `done` event "
                         "holding the full answer, or an `error` event")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "When was the Ford Mustang introduced?", "k_text": 3, "max_new_tokens": 64},
        {"prompt": "Describe the 1964 Mustang.", "stream": True, "images": True}]})


class CitationOut(_Response):
    marker: int
    chunk_id: str
    source: str
    page: int | None
    modality: str
    snippet: str


class SourceOut(_Response):
    marker: int
    chunk_id: str
    source: str
    page: int | None
    modality: str
    score: float


class GeneratedOut(_Response):
    text: str
    citations: list[CitationOut]
    unsupported: list[str]
    abstained: bool
    images: list[dict[str, Any]] = Field(description="Generated images; each has a `url` served by "
                                         "GET /v1/images/{id}")
    removed_citations: list[int]
    abstain_reason: str | None
    sources: list[SourceOut]
    model: str
    finish_reason: str | None
    usage: dict[str, Any]
    withheld: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Sources with text addressed to the model (instructions to the assistant, a forged chat turn), kept out of "
        "the prompt: marker (0: nothing else in it, so not given), chunk_id, source, text (what was withheld)"))

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "text": "The Ford Mustang was introduced in April 1964 [1].",
        "citations": [{"marker": 1, "chunk_id": "0d1f…", "source": "/data/uploads/acme-…/mustang.md", "page": None,
                       "modality": "text", "snippet": "The Ford Mustang was introduced in April 1964."}],
        "unsupported": [], "abstained": False, "images": [], "removed_citations": [], "abstain_reason": None,
        "sources": [{"marker": 1, "chunk_id": "0d1f…", "source": "/data/uploads/acme-…/mustang.md", "page": None,
                     "modality": "text", "score": 0.33}],
        "model": "SmolLM2-135M-Instruct", "finish_reason": "stop",
        "usage": {"prompt_tokens": 312, "completion_tokens": 14}}]})


# -- evals -------------------------------------------------------------------------------------------------------
class EvalRequest(_Request):
    dataset: str = Field(min_length=1, max_length=4096, description='"halueval", "tuxpaint", or a .jsonl eval '
                         "set inside api.server_root")
    corpus: str | None = Field(default=None, max_length=4096, description="The corpus, inside api.server_root")
    limit: int | None = Field(default=None, ge=1, le=1_000_000, description="First N records (<= "
                              "api.max_eval_records)")
    retrieval_only: bool = True
    max_new_tokens: int = Field(default=64, ge=1, le=1024)

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"dataset": "halueval", "corpus": "halueval/qa_dev.jsonl", "limit": 20, "retrieval_only": True}]})


class EvalJobOut(_Response):
    id: str
    status: Literal["queued", "running", "done", "failed"]
    dataset: str
    created: str
    started: str | None = None
    finished: str | None = None
    error: ErrorBody | None = None
    summary: dict[str, Any] | None = None
    report: dict[str, Any] | None = Field(default=None, description="The full report.json when done")
    files: list[str] = Field(default_factory=list, description="Report files: GET /v1/evals/{id}/files/{name}")


class EvalJobList(_Response):
    jobs: list[EvalJobOut]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in ((400, "Bad input"), (401, "Missing or unknown API key"), (403, "Forbidden"),
                       (404, "Not found (or another tenant's)"), (413, "Request or upload too large"),
                       (422, "Request does not match the schema"), (503, "Not ready, or a backend is unavailable"))
}
