"""DOCX and PPTX: text and tables through unstructured, pictures through python-docx / python-pptx.

Both formats are zip packages: the central directory is checked first (total uncompressed size, ratio, member
count), before unstructured or python-docx/pptx decompress anything.

DOCX: text elements come from ``partition_docx`` (tables whole, as their cell text). Pictures are the ``a:blip``
(DrawingML, inline or floating) and ``v:imagedata`` (VML) references in the document body, in document order; the
``mc:Fallback`` copy of alternate content is skipped. Context: the picture's alt text (``wp:docPr`` descr/title),
else an adjacent caption paragraph ("Caption" style or "Figure ..."), else the text of its own paragraph, else the
nearest non-empty paragraph, else words from the picture's original file name (``pic:cNvPr`` name).

PPTX: text, tables and speaker notes come from ``partition_pptx(include_slide_notes=True)``; notes are marked with
``metadata["notes"] = True`` and placed after their slide's content. Pictures (also inside group shapes and
picture placeholders) get ``page`` = slide number and ``bbox`` in points from the shape position (group transforms
applied), ``metadata["page_size"]`` = the slide size in points. Context: alt text (``descr``) unless it is only a
file name, else the slide title and the nearest text shape, else the file-name words of the alt text.

In both formats images are placed in reading order by locating the text around them in the document-order text.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

from ingest.elements import Element, ParseOptions
from ingest.nlp import ensure_offline_nlp
from ingest.parsers._common import (
    CAPTION_RE,
    MAX_IMAGES_PER_DOCUMENT,
    clean_text,
    filename_words,
    from_unstructured,
    image_element,
    join_context,
    locate_elements,
    looks_like_filename,
    merge_by_offset,
    squash,
)
from ingest.safety import check_zip_archive

logger = logging.getLogger(__name__)

EMU_PER_POINT = 12700

_NS = {
    "w": "http://schemas.openxmlformats.org/wordprocessingml/2006/main",
    "wp": "http://schemas.openxmlformats.org/drawingml/2006/wordprocessingDrawing",
    "a": "http://schemas.openxmlformats.org/drawingml/2006/main",
    "pic": "http://schemas.openxmlformats.org/drawingml/2006/picture",
    "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
    "v": "urn:schemas-microsoft-com:vml",
    "o": "urn:schemas-microsoft-com:office:office",
    "mc": "http://schemas.openxmlformats.org/markup-compatibility/2006",
    "p": "http://schemas.openxmlformats.org/presentationml/2006/main",
}


def _q(name: str) -> str:
    prefix, local = name.split(":")
    return f"{{{_NS[prefix]}}}{local}"


_W_T, _W_P, _W_TAB = _q("w:t"), _q("w:p"), _q("w:tab")
_A_BLIP, _V_IMAGEDATA, _MC_FALLBACK = _q("a:blip"), _q("v:imagedata"), _q("mc:Fallback")
_R_EMBED, _R_LINK, _R_ID = _q("r:embed"), _q("r:link"), _q("r:id")


# ---------------------------------------------------------------------------------------------------------------
# DOCX
# ---------------------------------------------------------------------------------------------------------------


def parse_docx(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
    """Text, tables and pictures of a DOCX in reading order."""
    # 1. Zip guard before anything decompresses.
    check_zip_archive(data, options.max_archive_bytes, options.max_archive_ratio, what="DOCX")

    # 2. Text and tables through unstructured.
    ensure_offline_nlp()
    from unstructured.partition.docx import partition_docx

    texts = from_unstructured(partition_docx(file=io.BytesIO(data), languages=["eng"]))

    # 3. Pictures through python-docx, with their offsets in the body's text stream.
    import docx

    document = docx.Document(io.BytesIO(data))
    stream, images = _docx_pictures(document, options, path.name)

    # 4. Reading order.
    return merge_by_offset(texts, locate_elements(texts, stream), images)


def _walk(element: Any) -> Any:
    """Pre-order walk of an lxml tree that skips ``mc:Fallback`` copies of alternate content."""
    yield element
    for child in element:
        if child.tag == _MC_FALLBACK:
            continue
        yield from _walk(child)


def _docx_pictures(document: Any, options: ParseOptions, name: str) -> tuple[str, list[tuple[int, Element]]]:
    body = document.element.body
    related = document.part.related_parts
    pieces: list[str] = []
    length = 0
    images: list[tuple[int, Element]] = []
    for node in _walk(body):
        tag = node.tag
        if tag == _W_T:
            piece = squash(node.text or "")
            pieces.append(piece)
            length += len(piece)
            continue
        if tag == _A_BLIP:
            rel_id = node.get(_R_EMBED) or ""
            if not rel_id and node.get(_R_LINK):
                logger.info("%s: skipping a linked (external) picture", name)
                continue
        elif tag == _V_IMAGEDATA:
            rel_id = node.get(_R_ID) or ""
        else:
            continue
        if len(images) >= MAX_IMAGES_PER_DOCUMENT:
            logger.warning("%s: image limit of %d reached; later pictures are skipped", name,
                           MAX_IMAGES_PER_DOCUMENT)
            break
        part = related.get(rel_id)
        blob = getattr(part, "blob", None)
        if not blob:
            logger.warning("%s: picture reference %r has no image part; skipped", name, rel_id)
            continue
        partname = str(getattr(part, "partname", rel_id)).lstrip("/")
        context, source = _docx_context(node)
        element = image_element(blob, options, what=f"{name}: picture {partname}", context=context,
                                context_source=source, metadata={"source": partname})
        if element is not None:
            images.append((length, element))
    return "".join(pieces), images


def _text_of(paragraph: Any) -> str:
    return clean_text("".join(t.text or "" for t in paragraph.iter(_W_T)))


def _ancestor(node: Any, tags: tuple[str, ...]) -> Any:
    current = node.getparent()
    while current is not None and current.tag not in tags:
        current = current.getparent()
    return current


def _is_caption(paragraph: Any) -> bool:
    style = paragraph.find(f"{_q('w:pPr')}/{_q('w:pStyle')}")
    style_id = (style.get(_q("w:val")) or "").lower() if style is not None else ""
    return "caption" in style_id or bool(CAPTION_RE.match(_text_of(paragraph)))


def _docx_context(node: Any) -> tuple[str, str]:
    """(context, source) for a picture reference node (``a:blip`` or ``v:imagedata``)."""
    alt = ""
    file_name = ""
    holder = _ancestor(node, (_q("wp:inline"), _q("wp:anchor")))
    if holder is not None:
        doc_pr = holder.find(_q("wp:docPr"))
        if doc_pr is not None:
            alt = (doc_pr.get("descr") or doc_pr.get("title") or "").strip()
    picture = _ancestor(node, (_q("pic:pic"),))
    if picture is not None:
        c_nv_pr = picture.find(f"{_q('pic:nvPicPr')}/{_q('pic:cNvPr')}")
        if c_nv_pr is not None:
            alt = alt or (c_nv_pr.get("descr") or c_nv_pr.get("title") or "").strip()
            file_name = c_nv_pr.get("name") or ""
    if node.tag == _V_IMAGEDATA and not alt:
        shape = node.getparent()
        if shape is not None:
            alt = (shape.get("alt") or "").strip()
        alt = alt or (node.get(_q("o:title")) or "").strip()
    if alt and not looks_like_filename(alt):
        return alt, "alt"
    if alt:
        file_name = alt
    paragraph = _ancestor(node, (_W_P,))
    if paragraph is not None:
        following = [p for p in paragraph.itersiblings() if p.tag == _W_P][:2]
        preceding = [p for p in paragraph.itersiblings(preceding=True) if p.tag == _W_P][:2]
        for candidate in following + preceding:
            if _is_caption(candidate) and _text_of(candidate):
                return _text_of(candidate), "caption"
        own = _text_of(paragraph)
        if own:
            return own, "paragraph"
        for candidate in _nearest_paragraphs(paragraph):
            text = _text_of(candidate)
            if text:
                return text, "nearby"
    words = filename_words(file_name) if looks_like_filename(file_name) else ""
    return words, "filename" if words else ""


def _nearest_paragraphs(paragraph: Any, limit: int = 3) -> list[Any]:
    """Up to ``limit`` paragraphs before, then after, in the same container."""
    before = [p for p in paragraph.itersiblings(preceding=True) if p.tag == _W_P][:limit]
    after = [p for p in paragraph.itersiblings() if p.tag == _W_P][:limit]
    return before + after


# ---------------------------------------------------------------------------------------------------------------
# PPTX
# ---------------------------------------------------------------------------------------------------------------


def parse_pptx(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
    """Slide text, tables, pictures and speaker notes of a PPTX, slide by slide."""
    # 1. Zip guard before anything decompresses.
    check_zip_archive(data, options.max_archive_bytes, options.max_archive_ratio, what="PPTX")

    # 2. Text, tables and notes through unstructured.
    ensure_offline_nlp()
    from unstructured.partition.pptx import partition_pptx

    texts = from_unstructured(partition_pptx(file=io.BytesIO(data), include_slide_notes=True, languages=["eng"]))

    # 3. Pictures and notes slide by slide through python-pptx.
    import pptx

    presentation = pptx.Presentation(io.BytesIO(data))
    slide_size = (round((presentation.slide_width or 0) / EMU_PER_POINT, 2),
                  round((presentation.slide_height or 0) / EMU_PER_POINT, 2))
    out: list[Element] = []
    image_count = 0
    for number, slide in enumerate(presentation.slides, start=1):
        slide_texts = [t for t in texts if t.page == number]
        notes = _mark_notes(slide, slide_texts)
        body = [t for t in slide_texts if not t.metadata.get("notes")]
        stream, pictures = _slide_pictures(slide, number, slide_size, options, path.name,
                                           MAX_IMAGES_PER_DOCUMENT - image_count)
        image_count += len(pictures)
        out.extend(merge_by_offset(body, locate_elements(body, stream), pictures))
        out.extend(notes)
    out.extend(t for t in texts if t.page is None or t.page > len(presentation.slides))
    return out


def _mark_notes(slide: Any, slide_texts: list[Element]) -> list[Element]:
    """Find the speaker-notes element of a slide among its elements, mark it ``notes``; returns the notes."""
    from dataclasses import replace

    if not slide.has_notes_slide:
        return []
    frame = slide.notes_slide.notes_text_frame
    notes_text = clean_text(frame.text) if frame is not None else ""
    if not notes_text:
        return []
    for index, element in enumerate(slide_texts):
        if element.text == notes_text:
            marked = replace(element, kind="text", metadata={**element.metadata, "notes": True})
            slide_texts[index] = marked
            return [marked]
    return []


def _iter_shapes(shapes: Any, groups: tuple[Any, ...] = ()) -> Any:
    """(shape, enclosing groups outermost first) for every non-group shape, as unstructured flattens them."""
    from pptx.shapes.group import GroupShape

    for shape in shapes:
        if isinstance(shape, GroupShape):
            yield from _iter_shapes(shape.shapes, groups + (shape,))
        else:
            yield shape, groups


def _group_transform(group: Any) -> tuple[float, float, float, float, float, float] | None:
    """(off_x, off_y, ch_off_x, ch_off_y, scale_x, scale_y) of a group's child coordinate space."""
    xfrm = group._element.grpSpPr.find(_q("a:xfrm"))
    if xfrm is None:
        return None
    parts = {child.tag.split("}")[1]: child for child in xfrm}
    try:
        off, ext, ch_off, ch_ext = parts["off"], parts["ext"], parts["chOff"], parts["chExt"]
    except KeyError:
        return None
    ch_cx, ch_cy = int(ch_ext.get("cx", 0)), int(ch_ext.get("cy", 0))
    scale_x = int(ext.get("cx", 0)) / ch_cx if ch_cx else 1.0
    scale_y = int(ext.get("cy", 0)) / ch_cy if ch_cy else 1.0
    return (int(off.get("x", 0)), int(off.get("y", 0)), int(ch_off.get("x", 0)), int(ch_off.get("y", 0)),
            scale_x, scale_y)


def _slide_box(shape: Any, groups: tuple[Any, ...]) -> tuple[float, float, float, float] | None:
    """A shape's box on the slide in points (group transforms applied, innermost first)."""
    if shape.left is None or shape.top is None or shape.width is None or shape.height is None:
        return None
    x0, y0 = float(shape.left), float(shape.top)
    x1, y1 = x0 + float(shape.width), y0 + float(shape.height)
    for group in reversed(groups):
        transform = _group_transform(group)
        if transform is None:
            continue
        off_x, off_y, ch_x, ch_y, sx, sy = transform
        x0, x1 = off_x + (x0 - ch_x) * sx, off_x + (x1 - ch_x) * sx
        y0, y1 = off_y + (y0 - ch_y) * sy, off_y + (y1 - ch_y) * sy
    return tuple(round(v / EMU_PER_POINT, 2) for v in (x0, y0, x1, y1))  # type: ignore[return-value]


def _shape_text(shape: Any) -> str:
    if getattr(shape, "has_table", False):
        return " ".join(cell.text for row in shape.table.rows for cell in row.cells)
    if getattr(shape, "has_text_frame", False):
        return shape.text_frame.text
    return ""


def _slide_pictures(slide: Any, number: int, slide_size: tuple[float, float], options: ParseOptions, name: str,
                    budget: int) -> tuple[str, list[tuple[int, Element]]]:
    """The slide's text stream in unstructured's shape order (top, then left) and its pictures with offsets."""
    from pptx.shapes.picture import Picture

    shapes = sorted(_iter_shapes(slide.shapes), key=lambda item: (item[0].top or 0, item[0].left or 0))
    title_shape = slide.shapes.title
    title = clean_text(title_shape.text_frame.text) if title_shape is not None and title_shape.has_text_frame else ""
    text_boxes = [(clean_text(_shape_text(s)), _slide_box(s, g)) for s, g in shapes if not isinstance(s, Picture)]
    text_boxes = [(text, box) for text, box in text_boxes if text and box is not None]
    pieces: list[str] = []
    length = 0
    pictures: list[tuple[int, Element]] = []
    for shape, groups in shapes:
        if not isinstance(shape, Picture):
            piece = squash(_shape_text(shape))
            pieces.append(piece)
            length += len(piece)
            continue
        if len(pictures) >= budget:
            logger.warning("%s: image limit of %d reached; later pictures are skipped", name,
                           MAX_IMAGES_PER_DOCUMENT)
            break
        what = f"{name}: picture {shape.name!r} on slide {number}"
        try:
            blob = shape.image.blob
        except Exception as exc:  # noqa: BLE001 - linked or missing image part
            logger.warning("skipping %s: no embedded image (%s)", what, exc)
            continue
        box = _slide_box(shape, groups)
        context, source = _pptx_context(shape, box, title, text_boxes)
        element = image_element(blob, options, what=what, page=number, bbox=box, context=context,
                                context_source=source,
                                metadata={"source": _picture_partname(shape), "page_size": list(slide_size)})
        if element is not None:
            pictures.append((length, element))
    return "".join(pieces), pictures


def _picture_partname(shape: Any) -> str:
    """The package part holding a picture's image ("ppt/media/image1.png"), else the shape's name."""
    try:
        return str(shape.part.related_part(shape._element.blip_rId).partname).lstrip("/")
    except Exception:  # noqa: BLE001 - odd or missing relationship: the name still identifies the picture
        return str(shape.name)


def _pptx_context(shape: Any, box: tuple[float, float, float, float] | None, title: str,
                  text_boxes: list[tuple[str, tuple[float, float, float, float] | None]]) -> tuple[str, str]:
    c_nv_pr = shape._element.find(f"{_q('p:nvPicPr')}/{_q('p:cNvPr')}")
    alt = ""
    if c_nv_pr is not None:
        alt = (c_nv_pr.get("descr") or c_nv_pr.get("title") or "").strip()
    if alt and not looks_like_filename(alt):
        return alt, "alt"
    nearby = ""
    if box is not None:
        candidates = [(text, other) for text, other in text_boxes if other is not None and text != title]
        if candidates:
            nearby = min(candidates, key=lambda item: _distance(box, item[1]))[0]  # type: ignore[arg-type]
    context = join_context(title, nearby)
    if context:
        return context, "slide"
    words = filename_words(alt) if alt else ""
    return words, "filename" if words else ""


def _distance(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    dx = max(0.0, b[0] - a[2], a[0] - b[2])
    dy = max(0.0, b[1] - a[3], a[1] - b[3])
    return math.hypot(dx, dy)
