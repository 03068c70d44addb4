"""Format parsers of the ingest stage: bytes of one source -> ordered ``Element``s.

Public API::

    sniff_kind(path, data) -> "pdf" | "docx" | "pptx" | "html" | "markdown" | "text" | "image"
    parse_file(path, data, options) -> list[Element]
    SUPPORTED_EXTENSIONS  # frozenset of lower-case extensions, with the dot

``parse_file`` finds the real format from the bytes (never from the extension alone), runs that format's parser
and returns its elements in reading order, or raises ``mmrag.errors.BadInputError`` with a one-line reason: empty,
corrupt or truncated file, encrypted PDF, extension that does not match the content, decompression or zip bomb,
unsupported type, or nothing extractable. Any other exception inside a parser is turned into a BadInputError
naming the exception type and message; no traceback escapes.

Per format (see each module): ``pdf`` (unstructured "fast" + pypdfium2 images), ``office`` (DOCX, PPTX), ``web``
(HTML, Markdown), ``plain`` (text), ``image`` (image files). Repeated identical images within one document are
kept once (``metadata["pages"]`` lists every page they appear on).

Element metadata written by the parsers: ``category`` (unstructured's element class), ``depth`` (titles and list
items), ``notes`` (PPTX speaker notes), ``origin`` ("pdfium" for PDF text taken from PDFium's text layer), and for
images ``format``, ``width``, ``height``, ``source`` (part name, file or URL), ``context_source`` (where the
context came from: alt, caption, paragraph, nearby, slide, title, page, filename, sidecar), ``page_size`` (PDF/PPTX,
points) and ``pages``. Boxes are ``(x0, y0, x1, y1)`` in points, origin at the top-left of the page or slide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ingest.elements import Element, ParseOptions
from ingest.parsers._common import dedupe_images
from ingest.parsers._sniff import SUPPORTED_EXTENSIONS, sniff_kind
from mmrag.errors import BadInputError

__all__ = ["SUPPORTED_EXTENSIONS", "parse_file", "sniff_kind"]

logger = logging.getLogger(__name__)

Parser = Callable[[Path, bytes, ParseOptions], list[Element]]


def _parser_for(kind: str) -> Parser:
    """The parser of a kind, imported on first use (unstructured and friends are slow to import)."""
    if kind == "pdf":
        from ingest.parsers.pdf import parse_pdf

        return parse_pdf
    if kind == "docx":
        from ingest.parsers.office import parse_docx

        return parse_docx
    if kind == "pptx":
        from ingest.parsers.office import parse_pptx

        return parse_pptx
    if kind == "html":
        from ingest.parsers.web import parse_html

        return parse_html
    if kind == "markdown":
        from ingest.parsers.web import parse_markdown

        return parse_markdown
    if kind == "text":
        from ingest.parsers.plain import parse_text

        return parse_text
    if kind == "image":
        from ingest.parsers.image import parse_image

        return parse_image
    raise BadInputError(f"unsupported kind {kind!r}")


def parse_file(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
    """Parse one source's bytes into elements in reading order; BadInputError with a one-line reason otherwise.

    ``path`` names the source (its extension is checked against the content; its folder anchors relative image
    references of HTML/Markdown and the sidecar caption of an image); ``data`` is the file's content.
    """
    # 1. Check inputs: the real format from the bytes.
    path = Path(path)
    kind = sniff_kind(path, data)
    parser = _parser_for(kind)

    # 2. Parse; anything unexpected becomes a one-line BadInputError. (Parsers call ingest.nlp.ensure_offline_nlp
    #    right before their first unstructured call, so cheap rejections never import spaCy.)
    try:
        elements = parser(path, data, options)
    except BadInputError:
        raise
    except RecursionError as exc:
        raise BadInputError(f"cannot parse {kind}: structure nested too deeply") from exc
    except MemoryError as exc:
        raise BadInputError(f"cannot parse {kind}: out of memory") from exc
    except Exception as exc:  # noqa: BLE001 - third-party parsers raise anything on hostile input
        logger.debug("parser for %s failed on %s", kind, path, exc_info=True)
        raise BadInputError(f"cannot parse {kind}: {_describe(exc)}") from exc

    # 3. Nothing found is an error too; repeated images are kept once.
    elements = dedupe_images([e for e in elements if e.kind == "image" or e.text.strip()])
    if not elements:
        raise BadInputError(f"no extractable text or images in this {kind} file")
    return elements


def _describe(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    if len(message) > 300:
        message = message[:300] + "…"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
