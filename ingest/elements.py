"""What a parser returns: the ordered elements of one source, before chunking.

Parsers know formats, nothing about chunking, models or Milvus. A parser either returns elements or raises
``mmrag.errors.BadInputError`` with a one-line reason; it never returns a partial result silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ElementKind = Literal["title", "text", "table", "image"]


@dataclass(frozen=True)
class Element:
    kind: ElementKind
    text: str = ""  # title/text/table text; empty for images
    page: int | None = None  # 1-based page or slide number where the format has pages
    bbox: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1) in the page's units (PDF points)
    image: bytes | None = None  # encoded image bytes (PNG, JPEG, ...) for kind == "image"
    context: str = ""  # for images: caption, alt text or the nearest paragraph
    metadata: dict[str, Any] = field(default_factory=dict)
    # The decoded image (Pillow) when the parser already decoded it, so preprocessing skips a second decode.
    # Set for stand-alone image files only: documents with many embedded images would hold them all in memory.
    decoded: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ParseOptions:
    """Limits and switches every parser honours (filled from the ``ingest`` settings section)."""

    max_image_pixels: int = 64_000_000  # decompression-bomb guard for any image, embedded or standalone
    max_archive_bytes: int = 512 * 1024 * 1024  # total uncompressed size of a DOCX/PPTX zip
    max_archive_ratio: float = 200.0  # uncompressed / compressed size of a DOCX/PPTX zip
    min_image_side: int = 16  # embedded images smaller than this (icons, spacers) are dropped
    fetch_remote: bool = False  # HTML/Markdown: fetch http(s) images (never loopback/private/link-local)
    remote_timeout_s: float = 10.0
    max_remote_bytes: int = 20 * 1024 * 1024
