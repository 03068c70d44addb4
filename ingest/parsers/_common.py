"""What every format parser shares: text cleaning, unstructured-element mapping, image preparation, context
helpers, reading-order merging of images into text, and de-duplication of repeated images.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ingest.elements import Element, ElementKind, ParseOptions
from ingest.safety import check_image
from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_IMAGES_PER_DOCUMENT = 2000  # embedded images beyond this are dropped (with one warning)
LOCATE_WINDOW = 100_000  # characters of squashed text searched for the next text element
CONTEXT_MAX_CHARS = 600  # an image's context is a caption or a paragraph, not a page

# Formats whose bytes are handed on as they are; anything else (and any multi-frame image) becomes a PNG.
PASSTHROUGH_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})

CAPTION_RE = re.compile(r"^\s*(figure|fig\.?|image|picture|photo|illustration|plate|chart|diagram)\s*[\dIVXivx]",
                        re.IGNORECASE)
_IMAGE_FILE_RE = re.compile(r"^[^\s/\\]+\.(png|jpe?g|gif|bmp|tiff?|webp|emf|wmf|svg|ico|heic)$", re.IGNORECASE)
_GENERIC_NAME_RE = re.compile(r"^(image|img|picture|pic|photo|dsc|dscn|screenshot|scan|untitled|clip_image|media)"
                              r"[\s_\-]*\d*$", re.IGNORECASE)
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "st", "\ufb06": "st", "\u00a0": " ", "\u00ad": "", "\u200b": "",
                            "\ufeff": ""})
_PAGE_NUMBER_RE = re.compile(
    r"^(page\s*)?(\d+|(?=[ivxlcdm])m{0,3}(cm|cd|d?c{0,3})(xc|xl|l?x{0,3})(ix|iv|v?i{0,3}))(\s*(/|of)\s*\d+)?$",
    re.IGNORECASE,
)

# unstructured categories that carry no text of their own, or that parsers replace with their own extraction
_DROPPED_CATEGORIES = frozenset({"PageBreak", "Image", "PageNumber"})
_RUNNING_CATEGORIES = frozenset({"Header", "Footer"})


def clean_text(text: str) -> str:
    """Undo PDF ligatures, drop soft hyphens and zero-width characters, collapse whitespace."""
    return " ".join(text.translate(_LIGATURES).split())


def truncate(text: str, limit: int = CONTEXT_MAX_CHARS) -> str:
    text = clean_text(text)
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip() + "…"


def looks_like_filename(text: str) -> bool:
    """True for alt texts that are just an image file name ("python-powered.png"), as office tools write them."""
    return bool(_IMAGE_FILE_RE.match(text.strip()))


def filename_words(name: str) -> str:
    """Words from a file name: "0002_peacock.png" -> "peacock"; generic names ("image1.png", "IMG_2031") -> ""."""
    stem = name.strip().rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    if "." in stem:
        stem = stem.rsplit(".", 1)[0]
    stem = re.sub(r"^\d+[\s_\-.]+", "", stem)
    if _GENERIC_NAME_RE.match(stem) or not re.search(r"[A-Za-z]{2,}", stem):
        return ""
    return " ".join(re.sub(r"[_\-.+]+", " ", stem).split())


def join_context(*parts: str) -> str:
    """Join non-empty, distinct context parts (a caption after its neighbour text), truncated."""
    seen: list[str] = []
    for part in parts:
        part = clean_text(part)
        if part and all(part.lower() not in other.lower() for other in seen):
            seen = [other for other in seen if other.lower() not in part.lower()]
            seen.append(part)
    return truncate(" — ".join(seen))


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # encoded bytes to store (original, or PNG)
    format: str  # format of ``data``
    source_format: str  # format the image came in
    width: int
    height: int
    image: Any = None  # the decoded first frame (Pillow), so a consumer need not decode the bytes again


def prepare_image(data: bytes, options: ParseOptions, *, what: str = "image") -> PreparedImage:
    """Check and fully decode an image, then return the bytes to keep.

    The original bytes are kept for PNG/JPEG/WebP/GIF/BMP/TIFF; multi-frame images (animated GIF/WebP/PNG,
    multi-page TIFF) and other formats become a PNG of the first frame. Raises BadInputError.
    """
    checked = check_image(data, options.max_image_pixels, what=what)
    if checked.format in PASSTHROUGH_FORMATS and (checked.frames <= 1 or checked.format == "MPO"):
        return PreparedImage(data, checked.format, checked.format, checked.width, checked.height, checked.image)
    image = checked.image
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except Exception as exc:  # noqa: BLE001 - unusual modes; one last conversion
        buffer = io.BytesIO()
        try:
            image.convert("RGBA").save(buffer, format="PNG")
        except Exception as exc2:  # noqa: BLE001
            raise BadInputError(f"{what}: cannot re-encode {checked.format} as PNG ({type(exc2).__name__})") from exc
    return PreparedImage(buffer.getvalue(), "PNG", checked.format, checked.width, checked.height, image)


def image_element(
    data: bytes,
    options: ParseOptions,
    *,
    what: str,
    page: int | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    context: str = "",
    context_source: str = "",
    metadata: dict[str, Any] | None = None,
) -> Element | None:
    """An "image" Element for an embedded image, or None (with a log line) when it is unreadable or too small.

    Embedded images never fail their document: a broken one is skipped with a warning.
    """
    try:
        prepared = prepare_image(data, options, what=what)
    except BadInputError as exc:
        logger.warning("skipping %s", exc)
        return None
    if min(prepared.width, prepared.height) < options.min_image_side:
        logger.debug("skipping %s: %dx%d is below min_image_side=%d", what, prepared.width, prepared.height,
                     options.min_image_side)
        return None
    meta: dict[str, Any] = {
        "format": prepared.format,
        "width": prepared.width,
        "height": prepared.height,
    }
    if prepared.source_format != prepared.format:
        meta["source_format"] = prepared.source_format
    if context_source and context:
        meta["context_source"] = context_source
    meta.update(metadata or {})
    return Element(kind="image", page=page, bbox=bbox, image=prepared.data, context=truncate(context),
                   metadata=meta)


def dedupe_images(elements: Sequence[Element]) -> list[Element]:
    """Keep the first occurrence of each distinct image (same bytes), e.g. a logo on every page.

    The kept element takes the first non-empty context of its copies and lists every page it appears on in
    ``metadata["pages"]`` when there is more than one.
    """
    first: dict[str, int] = {}
    out: list[Element] = []
    pages: dict[int, list[int]] = {}
    contexts: dict[int, str] = {}
    for element in elements:
        if element.kind != "image" or element.image is None:
            out.append(element)
            continue
        digest = hashlib.sha256(element.image).hexdigest()
        if digest in first:
            index = first[digest]
            if element.page is not None and element.page not in pages[index]:
                pages[index].append(element.page)
            if not contexts.get(index) and element.context:
                contexts[index] = element.context
            continue
        first[digest] = len(out)
        pages[len(out)] = [element.page] if element.page is not None else []
        contexts[len(out)] = element.context
        out.append(element)
    for index, element in enumerate(out):
        if element.kind != "image":
            continue
        meta = element.metadata
        changes: dict[str, Any] = {}
        if len(pages.get(index, [])) > 1:
            meta = {**meta, "pages": pages[index]}
            changes["metadata"] = meta
        if contexts.get(index) and contexts[index] != element.context:
            changes["context"] = contexts[index]
        if changes:
            out[index] = replace(element, **changes)
    return out


def limit_images(images: list[T], what: str) -> list[T]:
    """The first ``MAX_IMAGES_PER_DOCUMENT`` images, with a warning when there were more."""
    if len(images) > MAX_IMAGES_PER_DOCUMENT:
        logger.warning("%s: keeping the first %d of %d images", what, MAX_IMAGES_PER_DOCUMENT, len(images))
        return images[:MAX_IMAGES_PER_DOCUMENT]
    return images


# ---------------------------------------------------------------------------------------------------------------
# unstructured elements
# ---------------------------------------------------------------------------------------------------------------


def _kind_for(category: str) -> ElementKind:
    if category == "Title":
        return "title"
    if category == "Table":
        return "table"
    return "text"


def _bbox_of(element: Any) -> tuple[float, float, float, float] | None:
    coordinates = getattr(element.metadata, "coordinates", None)
    points = getattr(coordinates, "points", None) if coordinates is not None else None
    if not points:
        return None
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return (round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2))


def from_unstructured(elements: Iterable[Any], *, with_bbox: bool = False) -> list[Element]:
    """Map unstructured elements to ours: Title -> "title", Table -> "table", everything else -> "text".

    Page breaks, unstructured's own image elements and page numbers are dropped; so are running headers and
    footers (a Header/Footer whose text repeats in the document, or that is only a page number). Every element
    keeps unstructured's category in ``metadata["category"]``.
    """
    items = [e for e in elements if getattr(e, "category", "") not in _DROPPED_CATEGORIES]
    running = Counter(_running_key(e.text) for e in items if e.category in _RUNNING_CATEGORIES)
    out: list[Element] = []
    for element in items:
        category = str(getattr(element, "category", "") or "Text")
        text = clean_text(element.text or "")
        if not text:
            continue
        if category in _RUNNING_CATEGORIES and (running[_running_key(element.text)] > 1
                                                or _PAGE_NUMBER_RE.match(text)):
            continue
        metadata: dict[str, Any] = {"category": category}
        depth = getattr(element.metadata, "category_depth", None)
        if isinstance(depth, int) and category in ("Title", "ListItem") and depth > 0:
            metadata["depth"] = depth
        page = getattr(element.metadata, "page_number", None)
        out.append(Element(kind=_kind_for(category), text=text, page=page if isinstance(page, int) else None,
                           bbox=_bbox_of(element) if with_bbox else None, metadata=metadata))
    return out


def _running_key(text: str) -> str:
    return re.sub(r"\d+", "#", " ".join((text or "").lower().split()))


# ---------------------------------------------------------------------------------------------------------------
# Reading order: images placed among text elements by their position in a document-order text stream
# ---------------------------------------------------------------------------------------------------------------


def squash(text: str) -> str:
    """Lower-case, ligature-free text with all whitespace removed: the key for locating text in a stream."""
    return "".join(text.translate(_LIGATURES).lower().split())


def locate_elements(elements: Sequence[Element], stream: str) -> list[int]:
    """Offsets of each text element in ``stream`` (a ``squash``-ed document-order text), monotone.

    An element is searched from where the previous one was found, by its first 64 characters, then its first
    16, within the next ``LOCATE_WINDOW`` characters (so text that never matches costs linear time, not
    quadratic); an element that is not found keeps the previous offset, so the text order never changes.
    """
    offsets: list[int] = []
    cursor = 0
    last = 0
    for element in elements:
        key = squash(element.text)
        found = -1
        for length in (64, 16):
            probe = key[:length]
            if probe:
                found = stream.find(probe, cursor, cursor + LOCATE_WINDOW)
                if found != -1:
                    cursor = found + len(probe)
                    break
        last = max(last, found) if found != -1 else last
        offsets.append(last)
    return offsets


def merge_by_offset(texts: Sequence[Element], text_offsets: Sequence[int],
                    images: Sequence[tuple[int, Element]]) -> list[Element]:
    """Interleave images (with their stream offsets) into text elements; an image goes before text that starts
    at or after its offset. Images without a page take the page of the text element before them (else after)."""
    keyed: list[tuple[int, int, int, Element]] = []
    for index, (offset, element) in enumerate(zip(text_offsets, texts, strict=True)):
        keyed.append((offset, 1, index, element))
    for index, (offset, element) in enumerate(images):
        keyed.append((offset, 0, index, element))
    keyed.sort(key=lambda item: (item[0], item[1], item[2]))
    merged = [item[3] for item in keyed]
    return inherit_pages(merged)


def inherit_pages(elements: list[Element]) -> list[Element]:
    """Give page-less images the page of the nearest text element before them (or after, at the start)."""
    out = list(elements)
    previous: int | None = None
    pending: list[int] = []
    for index, element in enumerate(out):
        if element.kind == "image" and element.page is None:
            if previous is not None:
                out[index] = replace(element, page=previous)
            else:
                pending.append(index)
        elif element.page is not None:
            previous = element.page
            for waiting in pending:
                out[waiting] = replace(out[waiting], page=element.page)
            pending = []
    return out
