"""HTML and Markdown: text through unstructured, ``<img>`` / ``![alt](src)`` images resolved safely.

Markdown is rendered to HTML (python-markdown, the same "tables" and "fenced_code" extensions unstructured uses),
so both formats share one image path. An image source is used when it is:

- a ``data:`` URI (base64 or percent-encoded), at most ``options.max_remote_bytes`` long;
- a local file (relative path, absolute path or ``file://`` URL) whose real path (symlinks followed) lies inside
  the document's own folder tree, i.e. under ``path.parent``. References that climb out of it (``../img.png``,
  ``/etc/...``) are refused: a document handed in through the API lives in a temporary folder, and any allowance
  above its folder would let it pull unrelated image files of the server into the index;
- an http(s) URL only when ``options.fetch_remote`` is on, and then only to public addresses
  (see ``ingest.safety.check_remote_url``), with ``options.remote_timeout_s`` and ``options.max_remote_bytes``.

An image that cannot be used is skipped with a logged warning; the document still parses. Context, in order: the
``alt`` text, the ``title`` attribute, the ``<figcaption>`` of the enclosing ``<figure>``, the text of the
enclosing paragraph, the nearest paragraph before (else after) it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from ingest.elements import Element, ParseOptions
from ingest.nlp import ensure_offline_nlp
from ingest.parsers._common import (
    MAX_IMAGES_PER_DOCUMENT,
    clean_text,
    from_unstructured,
    image_element,
    locate_elements,
    merge_by_offset,
    squash,
)
from ingest.parsers._sniff import decode_text
from ingest.safety import fetch_remote, resolve_local_reference
from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

MARKDOWN_EXTENSIONS = ["tables", "fenced_code"]
_SKIPPED_TAGS = frozenset({"script", "style", "template", "noscript", "head", "title"})
_XML_DECLARATION_RE = re.compile(r"^\s*<\?xml[^>]*\?>", re.IGNORECASE)
_PARAGRAPH_TAGS = ("p", "li", "dd", "td", "th", "blockquote", "figcaption", "h1", "h2", "h3", "h4", "h5", "h6")


def parse_html(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
    """Text, tables and resolvable images of an HTML file in reading order."""
    html = decode_text(data)
    check_html_nesting(html)
    ensure_offline_nlp()
    from unstructured.partition.html import partition_html

    texts = from_unstructured(partition_html(text=html, languages=["eng"]))
    return _with_images(texts, html, path, options)


def parse_markdown(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
    """Text, tables and resolvable images of a Markdown file in reading order."""
    import markdown

    text = decode_text(data)
    check_markdown_nesting(text)
    ensure_offline_nlp()
    from unstructured.partition.md import partition_md

    texts = from_unstructured(partition_md(text=text, languages=["eng"]))
    html = markdown.markdown(text, extensions=MARKDOWN_EXTENSIONS)
    return _with_images(texts, html, path, options)


MAX_MARKDOWN_DEPTH = 100  # list indentation (2 spaces a level) plus blockquote markers at the start of a line
_LINE_PREFIX_RE = re.compile(r"^[ \t>]*", re.MULTILINE)


def check_markdown_nesting(text: str, max_depth: int = MAX_MARKDOWN_DEPTH) -> None:
    """Refuse Markdown nested deeper than ``max_depth`` levels before python-markdown sees it: its time grows
    with the square of the nesting (a list nested 400 levels deep took 1.1 s, 3,000 levels did not finish in
    minutes), and no real document nests a hundred levels."""
    for match in _LINE_PREFIX_RE.finditer(text):
        prefix = match.group()
        if 2 * len(prefix) <= max_depth:  # a character is at most two levels (a tab)
            continue
        depth = prefix.count(">") + len(prefix.replace(">", "").expandtabs(4)) // 2
        if depth > max_depth:
            line = text.count("\n", 0, match.start()) + 1
            raise BadInputError(f"Markdown nested {depth} levels deep on line {line} (the limit is {max_depth}): "
                                "structure nested too deeply")


MAX_HTML_DEPTH = 1000  # element nesting; real pages stay far below (deep layouts reach a few dozen levels)
_HTML_TOKEN_RE = re.compile(r"<!--.*?-->|<(script|style)\b[^>]*>.*?</\1\s*>|<(/?)([a-zA-Z][a-zA-Z0-9:-]*)([^>]*)>",
                            re.S | re.I)
# Elements that never nest (void) or whose end tag is optional (a parser closes them at the next sibling): they do
# not deepen the tree however many are left open.
_FLAT_ELEMENTS = frozenset(
    "area base br col embed hr img input link meta param source track wbr "
    "p li dt dd tr td th option optgroup rp rt tbody thead tfoot colgroup caption html head body".split())


def check_html_nesting(html: str, max_depth: int = MAX_HTML_DEPTH) -> None:
    """Refuse HTML nested deeper than ``max_depth`` elements before a parser builds its tree: 200,000 nested
    ``<div>`` took 11 s and, with other files parsing beside it, pushed an ingest past 3 GB."""
    depth = 0
    for match in _HTML_TOKEN_RE.finditer(html):
        name = match.group(3)
        if name is None:  # a comment, or a script or style element with its content
            continue
        name = name.lower()
        if name in _FLAT_ELEMENTS or match.group(4).rstrip().endswith("/"):
            continue
        if match.group(2):  # an end tag
            depth = max(0, depth - 1)
            continue
        depth += 1
        if depth > max_depth:
            line = html.count("\n", 0, match.start()) + 1
            raise BadInputError(f"HTML nested more than {max_depth} elements deep at line {line}: "
                                "structure nested too deeply")


def _with_images(texts: list[Element], html: str, path: Path, options: ParseOptions) -> list[Element]:
    soup = _soup(html)
    stream, found = _stream_and_images(soup)
    images: list[tuple[int, Element]] = []
    for offset, tag in found:
        if len(images) >= MAX_IMAGES_PER_DOCUMENT:
            logger.warning("%s: image limit of %d reached; later images are skipped", path.name,
                           MAX_IMAGES_PER_DOCUMENT)
            break
        element = _image_from_tag(tag, path, options)
        if element is not None:
            images.append((offset, element))
    return merge_by_offset(texts, locate_elements(texts, stream), images)


def _soup(html: str) -> Any:
    from bs4 import BeautifulSoup

    html = _XML_DECLARATION_RE.sub("", html, count=1)  # XHTML: parse as HTML, like unstructured does
    try:
        return BeautifulSoup(html, "lxml")
    except Exception:  # noqa: BLE001 - lxml missing or refusing the markup
        return BeautifulSoup(html, "html.parser")


def _stream_and_images(soup: Any) -> tuple[str, list[tuple[int, Any]]]:
    """The document's visible text (``squash``-ed) and each ``<img>`` with its offset in that text."""
    from bs4 import NavigableString, Tag
    from bs4.element import PreformattedString  # comments, doctype, CDATA, processing instructions

    pieces: list[str] = []
    length = 0
    images: list[tuple[int, Any]] = []

    stack = [iter(soup.children)]  # iterative: deeply nested markup must not hit the recursion limit
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        if isinstance(child, PreformattedString):
            continue
        if isinstance(child, NavigableString):
            piece = squash(str(child))
            pieces.append(piece)
            length += len(piece)
        elif isinstance(child, Tag):
            name = (child.name or "").lower()
            if name in _SKIPPED_TAGS:
                continue
            if name == "img":
                images.append((length, child))
            stack.append(iter(child.children))
    return "".join(pieces), images


def _image_from_tag(tag: Any, path: Path, options: ParseOptions) -> Element | None:
    src = _source_of(tag)
    if not src:
        return None
    label = src if len(src) <= 120 else src[:60] + "…"
    try:
        data, source = _load_source(src, path, options)
    except BadInputError as exc:
        logger.warning("%s: skipping image %s: %s", path.name, label, exc)
        return None
    if data is None:
        return None
    context, context_source = _html_context(tag)
    return image_element(data, options, what=f"{path.name}: image {label}", context=context,
                         context_source=context_source, metadata={"source": source})


def _source_of(tag: Any) -> str:
    for attribute in ("src", "data-src"):
        value = (tag.get(attribute) or "").strip()
        if value:
            return value
    srcset = (tag.get("srcset") or "").strip()
    if srcset:
        return srcset.split(",")[0].strip().split(" ")[0]
    return ""


def _load_source(src: str, path: Path, options: ParseOptions) -> tuple[bytes | None, str]:
    """(bytes, provenance) for an image source; (None, "") for sources that are skipped on purpose."""
    if src.lower().startswith("data:"):
        return _decode_data_uri(src, options.max_remote_bytes), "data-uri"
    parts = urlsplit(src)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https") or (not scheme and src.startswith("//")):
        url = src if scheme else "https:" + src
        if not options.fetch_remote:
            logger.info("%s: remote image %s not fetched (fetch_remote is off)", path.name, url)
            return None, ""
        return fetch_remote(url, timeout_s=options.remote_timeout_s, max_bytes=options.max_remote_bytes), url
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise BadInputError(f"file URL on another host: {src}")
        reference = unquote(parts.path)
    elif scheme and len(scheme) > 1:  # "c:" would be a Windows drive letter, anything else a scheme
        raise BadInputError(f"unsupported URL scheme {scheme!r}")
    else:
        reference = unquote(parts.path)
    if not reference:
        raise BadInputError("empty local reference")
    base = path.parent
    resolved = resolve_local_reference(reference, base, base)
    size = resolved.stat().st_size
    if size > options.max_remote_bytes:
        raise BadInputError(f"{size:,} bytes exceeds the limit of {options.max_remote_bytes:,}")
    try:
        relative = resolved.relative_to(base.resolve()).as_posix()
    except ValueError:
        relative = reference
    return resolved.read_bytes(), relative


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise BadInputError("malformed data URI (no comma)")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise BadInputError(f"data URI longer than {max_bytes:,} bytes")
    if header.lower().rstrip().endswith(";base64"):
        try:
            data = base64.b64decode("".join(unquote(payload).split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadInputError(f"malformed base64 in data URI ({exc})") from exc
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise BadInputError(f"data URI longer than {max_bytes:,} bytes")
    return data


def _html_context(tag: Any) -> tuple[str, str]:
    """(context, source): alt, title, figcaption, enclosing paragraph, nearest paragraph."""
    alt = clean_text(tag.get("alt") or "")
    if alt:
        return alt, "alt"
    title = clean_text(tag.get("title") or "")
    if title:
        return title, "title"
    figure = tag.find_parent("figure")
    if figure is not None:
        caption = figure.find("figcaption")
        if caption is not None and clean_text(caption.get_text(" ")):
            return clean_text(caption.get_text(" ")), "caption"
    enclosing = tag.find_parent(_PARAGRAPH_TAGS)
    if enclosing is not None and clean_text(enclosing.get_text(" ")):
        return clean_text(enclosing.get_text(" ")), "paragraph"
    for finder in (tag.find_all_previous, tag.find_all_next):
        for candidate in finder("p", limit=3):
            text = clean_text(candidate.get_text(" "))
            if text:
                return text, "nearby"
    return "", ""
