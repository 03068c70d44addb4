"""JSON shapes shared by the CLI and the HTTP API (no web framework imported here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def grounding_json(grounding: Any, blob_ref: Callable[[Any], str]) -> dict[str, Any]:
    """The shape ``mmrag search --json`` prints and ``POST /v1/search`` returns.

    ``blob_ref(hit)`` names an image hit's bytes: the CLI gives the blob's path or URL, the API the
    ``/v1/images/{id}`` URL that serves it (server paths never leave the server)."""

    def common(hit: Any) -> dict[str, Any]:
        return {"id": hit.chunk.id, "doc_id": hit.chunk.doc_id, "source": hit.source, "page": hit.chunk.page,
                "score": hit.score, "scores": hit.scores}

    return {
        "text": [common(h) | {"text": h.chunk.text} for h in grounding.text_hits],
        "images": [common(h) | {"context": h.chunk.context, "blob": blob_ref(h)} for h in grounding.image_hits],
        "grounded": grounding.grounded,
    }
