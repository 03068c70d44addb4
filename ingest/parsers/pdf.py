"""PDF: text through unstructured (``partition_pdf``, strategy "fast"), embedded images through pypdfium2.

Steps: open with PDFium (encrypted or corrupt files fail here with a clear reason), extract text elements with
their page and box, extract image objects (including those nested in form XObjects) with their page and box, give
each image a context (the nearest caption-like line, "Figure 1: ...", plus the nearest text), and place each image
in reading order after the last text element that starts above it on its page.

Boxes are ``(x0, y0, x1, y1)`` in PDF points with the origin at the top-left of the page (as unstructured reports
text), so text and image boxes compare directly; ``metadata["page_size"]`` gives the page's width and height.

When unstructured returns no text (it swallows its own errors, and skips "too complex" pages) but PDFium finds a
text layer, the text is taken from PDFium page by page instead, so a document never loses its text silently.
PDFium is not thread-safe: every PDFium call here runs under one process-wide lock.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ingest.elements import Element, ParseOptions
from ingest.nlp import ensure_offline_nlp
from ingest.parsers._common import (
    CAPTION_RE,
    MAX_IMAGES_PER_DOCUMENT,
    from_unstructured,
    image_element,
    inherit_pages,
    join_context,
)
from ingest.safety import check_image
from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

PDFIUM_LOCK = threading.Lock()  # pypdfium2/PDFium must not be called from two threads at once
CAPTION_MAX_GAP_PT = 120.0  # a "Figure ..." line further than this from an image is not its caption


@dataclass(frozen=True)
class _PdfImage:
    page: int
    bbox: tuple[float, float, float, float]  # top-left origin, points
    data: bytes  # PNG or the original JPEG
    index: int  # order of appearance on the page
    metadata: dict[str, Any]


def parse_pdf(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
    """Text, tables and images of a PDF in reading order; BadInputError for encrypted, corrupt or empty ones."""
    # 1. Open with PDFium: encryption and corruption are reported here, before any text extraction.
    with PDFIUM_LOCK:
        page_sizes, images, pdfium_text = _pdfium_pass(data, options, path.name)

    # 2. Text through unstructured; PDFium's text layer when unstructured finds none.
    texts, found_any = _unstructured_text(data)
    if not found_any and any(t.strip() for t in pdfium_text):
        logger.warning("%s: unstructured extracted no text; using PDFium's text layer", path.name)
        texts = _fallback_text(pdfium_text)
    if not texts and not images:
        raise BadInputError("no extractable text or images (scanned PDF? OCR is not enabled)")
    if not texts and not found_any:
        logger.warning("%s: no text layer (scanned PDF? OCR is not enabled); keeping %d images", path.name,
                       len(images))

    # 3. Context for each image, then reading order.
    image_elements: list[tuple[_PdfImage, Element]] = []
    for image in images:
        context, source = _image_context(image, [t for t in texts if t.page == image.page])
        meta = dict(image.metadata)
        meta["page_size"] = list(page_sizes[image.page - 1])
        element = image_element(image.data, options, what=f"image {image.index + 1} on page {image.page}",
                                page=image.page, bbox=image.bbox, context=context, context_source=source,
                                metadata=meta)
        if element is not None:
            image_elements.append((image, element))
    return _reading_order(texts, image_elements)


def _pdfium_pass(data: bytes, options: ParseOptions, name: str) -> tuple[list[tuple[float, float]],
                                                                          list[_PdfImage], list[str]]:
    """Open the PDF with PDFium; return page sizes, images (checked and encoded) and each page's plain text."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        message = " ".join(str(exc).split())
        if "password" in message.lower():
            raise BadInputError("encrypted PDF: it needs a password to open") from exc
        raise BadInputError(f"corrupt or truncated PDF ({message})") from exc
    try:
        page_sizes: list[tuple[float, float]] = []
        images: list[_PdfImage] = []
        texts: list[str] = []
        for page_index in range(len(document)):
            page = document[page_index]
            try:
                width, height = page.get_size()
                page_sizes.append((round(width, 2), round(height, 2)))
                textpage = page.get_textpage()
                try:
                    texts.append(textpage.get_text_range())
                finally:
                    textpage.close()
                budget = MAX_IMAGES_PER_DOCUMENT - len(images)
                if budget > 0:
                    images.extend(_page_images(page, page_index + 1, height, width, options, name, pdfium_c,
                                               budget))
                    if len(images) == MAX_IMAGES_PER_DOCUMENT:
                        logger.warning("%s: image limit of %d reached on page %d; later images are skipped",
                                       name, MAX_IMAGES_PER_DOCUMENT, page_index + 1)
            finally:
                page.close()
        return page_sizes, images, texts
    finally:
        document.close()


def _page_images(page: Any, page_number: int, page_height: float, page_width: float, options: ParseOptions,
                 name: str, pdfium_c: Any, budget: int) -> list[_PdfImage]:
    """Image objects of one page (form XObjects included), as PNG/JPEG bytes with top-left-origin boxes."""
    found: list[_PdfImage] = []
    forms: list[Any] = []  # placement matrices of the enclosing form XObjects, outermost first
    wanted = [pdfium_c.FPDF_PAGEOBJ_IMAGE, pdfium_c.FPDF_PAGEOBJ_FORM]
    for obj in page.get_objects(filter=wanted, max_depth=8):
        if len(found) >= budget:
            break
        del forms[obj.level:]
        if obj.type == pdfium_c.FPDF_PAGEOBJ_FORM:
            forms.append(obj.get_matrix())
            continue
        what = f"{name}: image {len(found) + 1} on page {page_number}"
        try:
            px_width, px_height = obj.get_px_size()
        except Exception as exc:  # noqa: BLE001 - PdfiumError for broken image dictionaries
            logger.warning("skipping %s: no pixel size (%s)", what, exc)
            continue
        if px_width * px_height > options.max_image_pixels:
            logger.warning("skipping %s: %dx%d pixels exceeds the limit of %d", what, px_width, px_height,
                           options.max_image_pixels)
            continue
        if min(px_width, px_height) < options.min_image_side:
            continue
        try:
            encoded, meta = _encode_image(obj, options, what)
        except BadInputError as exc:
            logger.warning("skipping %s", exc)
            continue
        bbox = _page_bbox(obj.get_bounds(), forms, page_width, page_height)
        found.append(_PdfImage(page=page_number, bbox=bbox, data=encoded, index=len(found), metadata=meta))
    return found


def _page_bbox(bounds: tuple[float, float, float, float], forms: list[Any], page_width: float,
               page_height: float) -> tuple[float, float, float, float]:
    left, bottom, right, top = bounds
    corners = [(left, bottom), (left, top), (right, bottom), (right, top)]
    for matrix in reversed(forms):  # innermost form first, out to page space
        corners = [matrix.on_point(x, y) for x, y in corners]
    xs = [min(max(x, 0.0), page_width) for x, _ in corners]
    ys = [min(max(page_height - y, 0.0), page_height) for _, y in corners]
    return (round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2))


def _encode_image(obj: Any, options: ParseOptions, what: str) -> tuple[bytes, dict[str, Any]]:
    """The image as the reader sees it (masks applied): its own JPEG when that is exactly it, else a PNG."""
    try:
        bitmap = obj.get_bitmap(render=True)
    except Exception:  # noqa: BLE001 - rendering can fail on odd images; the raw bitmap is the fallback
        try:
            bitmap = obj.get_bitmap(render=False)
        except Exception as exc:  # noqa: BLE001
            raise BadInputError(f"{what}: cannot decode ({type(exc).__name__}: {exc})") from exc
    if bitmap.width * bitmap.height > options.max_image_pixels:
        raise BadInputError(f"{what}: rendered {bitmap.width}x{bitmap.height} exceeds the pixel limit")
    image = bitmap.to_pil().copy()  # to_pil() shares PDFium's buffer; the copy outlives the bitmap
    del bitmap
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        image = image.convert("RGB")
    if image.mode == "RGB" and obj.get_filters() == ["DCTDecode"]:
        original = _original_jpeg(obj, options)
        if original is not None:
            return original, {}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), {}


def _original_jpeg(obj: Any, options: ParseOptions) -> bytes | None:
    """The embedded JPEG stream itself when it decodes to an RGB or greyscale image (not CMYK/inverted)."""
    try:
        raw = obj.get_data(decode_simple=False)
        data = bytes(raw.tobytes() if hasattr(raw, "tobytes") else raw)
        checked = check_image(data, options.max_image_pixels, what="embedded JPEG")
    except Exception:  # noqa: BLE001 - fall back to the PNG of the rendered bitmap
        return None
    return data if checked.format == "JPEG" and checked.image.mode in ("RGB", "L") else None


def _unstructured_text(data: bytes) -> tuple[list[Element], bool]:
    """(our text elements, whether unstructured found any text at all, running heads included)."""
    ensure_offline_nlp()
    from unstructured.partition.pdf import partition_pdf

    try:
        elements = partition_pdf(file=io.BytesIO(data), strategy="fast", languages=["eng"])
    except Exception as exc:  # noqa: BLE001 - PDFium already accepted the file: fall back to its text layer
        logger.warning("unstructured could not read the PDF text (%s: %s)", type(exc).__name__,
                       " ".join(str(exc).split())[:200])
        return [], False
    found_any = any((getattr(e, "text", "") or "").strip() for e in elements)
    return from_unstructured(elements, with_bbox=True), found_any


def _fallback_text(page_texts: list[str]) -> list[Element]:
    """Text elements from PDFium's per-page plain text, grouped into paragraphs by unstructured's text rules."""
    from ingest.parsers.plain import partition_plain_text

    out: list[Element] = []
    for page_number, text in enumerate(page_texts, start=1):
        if text.strip():
            out.extend(replace(e, page=page_number, metadata={**e.metadata, "origin": "pdfium"})
                       for e in partition_plain_text(text))
    return out


def _box_distance(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    dx = max(0.0, b[0] - a[2], a[0] - b[2])
    dy = max(0.0, b[1] - a[3], a[1] - b[3])
    return math.hypot(dx, dy)


def _image_context(image: _PdfImage, page_texts: list[Element]) -> tuple[str, str]:
    """(context, source): the nearest caption-like line ("Figure 2: ...") and the nearest text on the page."""
    boxed = [t for t in page_texts if t.bbox is not None]
    if not boxed:
        if page_texts:
            return join_context(page_texts[0].text), "page"
        return "", ""
    nearest = min(boxed, key=lambda t: _box_distance(image.bbox, t.bbox))  # type: ignore[arg-type]
    captions = [t for t in boxed if CAPTION_RE.match(t.text)
                and _box_distance(image.bbox, t.bbox) <= CAPTION_MAX_GAP_PT]  # type: ignore[arg-type]
    caption = min(captions, key=lambda t: _box_distance(image.bbox, t.bbox), default=None)  # type: ignore[arg-type]
    if caption is None:
        return join_context(nearest.text), "nearby"
    if caption is nearest:
        return join_context(caption.text), "caption"
    return join_context(nearest.text, caption.text), "caption"


def _reading_order(texts: list[Element], images: list[tuple[_PdfImage, Element]]) -> list[Element]:
    """Place each image after the last text element (in reading order) of its page that starts above it,
    preferring text in the same column (horizontally overlapping the image); before the page's first text when
    nothing starts above it; pages without text keep their images in page order."""
    by_page: dict[int | None, list[int]] = defaultdict(list)
    for index, text in enumerate(texts):
        by_page[text.page].append(index)
    before: dict[int, list[Element]] = defaultdict(list)  # text index -> images placed before it
    after: dict[int, list[Element]] = defaultdict(list)  # text index -> images placed after it
    orphans: dict[int, list[Element]] = defaultdict(list)  # page without text -> its images
    for image, element in images:
        indices = by_page.get(image.page, [])
        if not indices:
            orphans[image.page].append(element)
            continue
        boxed = [i for i in indices if texts[i].bbox is not None]
        if not boxed:
            after[indices[-1]].append(element)
            continue
        above = [i for i in boxed if texts[i].bbox[1] <= image.bbox[1]]  # type: ignore[index]
        same_column = [i for i in above if _overlaps_horizontally(texts[i].bbox, image.bbox)]  # type: ignore[arg-type]
        chosen = same_column or above
        if chosen:
            after[chosen[-1]].append(element)
        else:
            before[indices[0]].append(element)
    out: list[Element] = []
    pending = sorted(orphans)
    for index, text in enumerate(texts):
        while pending and text.page is not None and pending[0] < text.page:
            out.extend(orphans[pending.pop(0)])
        out.extend(before.get(index, []))
        out.append(text)
        out.extend(after.get(index, []))
    for page in pending:
        out.extend(orphans[page])
    return inherit_pages(out)


def _overlaps_horizontally(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0])
