"""Standalone image files (PNG, JPEG, WebP, GIF, BMP, TIFF): one "image" element.

The image is checked against the pixel budget from its header, then fully decoded (a truncated file fails here).
Its bytes are kept as given, except multi-frame images (animated GIF/WebP/PNG, multi-page TIFF), which become a
PNG of their first frame. Its context is the file name in words ("0002_peacock.png" -> "peacock") followed by
the text of a sidecar caption file with the same stem and ``.txt`` next to it, when there is one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ingest.elements import Element, ParseOptions
from ingest.parsers._common import clean_text, filename_words, prepare_image
from ingest.parsers._sniff import decode_text

logger = logging.getLogger(__name__)

SIDECAR_MAX_BYTES = 64 * 1024


def parse_image(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
    """One image element; BadInputError for an unreadable, truncated or oversized image."""
    prepared = prepare_image(data, options, what="image")
    words = filename_words(path.name)
    sidecar = read_sidecar(path)
    context = "\n".join(part for part in (words, sidecar) if part)
    metadata: dict[str, object] = {
        "format": prepared.format,
        "width": prepared.width,
        "height": prepared.height,
        "source": path.name,
    }
    if prepared.source_format != prepared.format:
        metadata["source_format"] = prepared.source_format
    if context:
        metadata["context_source"] = "sidecar" if sidecar else "filename"
    return [Element(kind="image", image=prepared.data, context=context, metadata=metadata, decoded=prepared.image)]


def read_sidecar(path: Path) -> str:
    """Text of ``<stem>.txt`` beside the image (at most 64 KiB, whitespace collapsed), or ""."""
    sidecar = path.with_suffix(".txt")
    try:
        if sidecar == path or not sidecar.is_file():
            return ""
        size = sidecar.stat().st_size
        if size > SIDECAR_MAX_BYTES:
            logger.warning("ignoring caption file %s: %d bytes is above %d", sidecar, size, SIDECAR_MAX_BYTES)
            return ""
        return clean_text(decode_text(sidecar.read_bytes(), strict=False))
    except OSError as exc:
        logger.warning("cannot read caption file %s: %s", sidecar, exc)
        return ""
