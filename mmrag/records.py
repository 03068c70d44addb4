"""Records the stages exchange: small frozen dataclasses, JSON-ready through ``to_dict``."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

Modality = Literal["text", "image", "table"]
MODALITIES: tuple[str, ...] = ("text", "image", "table")


def to_dict(record: Any) -> dict[str, Any]:
    """A record as plain JSON-ready data (tuples become lists)."""
    return dataclasses.asdict(record)


@dataclass(frozen=True)
class Document:
    """One source: where it came from, its stable identity and the hash of the bytes that were ingested."""

    source: str  # URI or path as the user named it, normalised to an absolute path for local files
    doc_id: str  # stable identity of the source (hash of tenant and source), independent of its content
    version: str  # sha256 of the source's bytes
    mime: str
    tenant: str = "default"
    metadata: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def make_id(source: str, tenant: str) -> str:
        return hashlib.sha256(f"{tenant}\x00{source}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Chunk:
    """A unit of retrieval: a text passage, a table, or an image with its context."""

    id: str
    doc_id: str
    modality: Modality
    text: str = ""
    blob: str = ""  # content-addressed blob URI for images
    page: int | None = None
    bbox: tuple[float, float, float, float] | None = None
    order: int = 0
    context: str = ""  # for an image: caption, alt text or the nearest paragraph
    metadata: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def make_id(doc_id: str, modality: str, order: int, content: bytes | str) -> str:
        """Ids derive from the document, the position and the content, so re-ingesting is idempotent."""
        digest = hashlib.sha256()
        digest.update(f"{doc_id}\x00{modality}\x00{order}\x00".encode())
        digest.update(content.encode() if isinstance(content, str) else content)
        return digest.hexdigest()[:32]

    @property
    def search_text(self) -> str:
        """The text that dense and BM25 search see: the passage, or an image's context."""
        return self.text if self.modality != "image" else self.context


@dataclass(frozen=True)
class Failure:
    source: str
    reason: str


@dataclass(frozen=True)
class IngestReport:
    """What one ``ingest`` run did; ``mmrag ingest --json`` prints exactly this shape."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: tuple[Failure, ...] = ()
    chunks: dict[str, int] = field(default_factory=lambda: {"text": 0, "image": 0})

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk with its fused score and the per-signal scores that produced it."""

    chunk: Chunk
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class Grounding:
    prompt: str
    text_hits: tuple[Hit, ...] = ()
    image_hits: tuple[Hit, ...] = ()
    grounded: bool = False
