"""Chunking: elements -> chunks, title-aware and bounded by the text embedder's tokens, with overlap.

- A title starts a new chunk and is carried as the chunk's ``title`` (and prefixes its text, so the heading is
  searchable with the passage it heads). A title with no text under it is kept as text.
- Paragraphs accumulate until the next one would pass ``max_tokens``; the next chunk then starts with the last
  ``overlap`` tokens of the previous one, so a fact cut at a boundary is still found whole.
- A paragraph longer than the budget is cut into token windows with the same overlap.
- Tables stay whole when they fit; a larger table is cut between rows, each part repeating nothing but its rows.
- Images become one chunk each, with their context, placed right after the text chunk they appear in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Sequence

from ingest.elements import Element


class Tokenizer(Protocol):
    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def split_tokens(self, text: str, max_tokens: int, overlap: int) -> list[str]: ...

    def tail(self, text: str, tokens: int) -> str: ...


@dataclass(frozen=True)
class Draft:
    """A chunk before it has an id, vectors or a blob key."""

    modality: str  # text | table | image
    text: str = ""
    page: int | None = None
    image: bytes | None = None
    context: str = ""
    bbox: tuple[float, float, float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    decoded: Any = field(default=None, compare=False, repr=False)  # see Element.decoded


def chunk_elements(elements: Sequence[Element], tokenizer: Tokenizer, max_tokens: int, overlap: int) -> list[Draft]:
    if overlap >= max_tokens:
        raise ValueError(f"overlap ({overlap}) must be smaller than max_tokens ({max_tokens})")
    elements = _orphan_titles_as_text(elements)
    texts = [e.text for e in elements if e.kind != "image"]
    counts = iter(tokenizer.count_tokens(texts))
    drafts: list[Draft] = []
    title = ""
    parts: list[str] = []
    used = 0
    page: int | None = None
    extra: dict[str, Any] = {}

    held: list[Draft] = []  # images wait for the text chunk they sit in, so chunks keep reading order

    def emit(keep_tail: bool) -> None:
        nonlocal parts, used, extra
        if not parts:
            drafts.extend(held)
            held.clear()
            return
        body = "\n\n".join(parts)
        text = f"{title}\n\n{body}" if title and not body.startswith(title) else body
        drafts.append(Draft("text", text=text, page=page, meta={"title": title, **extra} if title else dict(extra)))
        if keep_tail and overlap:
            tail = tokenizer.tail(body, overlap)
            parts, used = [tail], overlap
        else:
            parts, used = [], 0
        extra = {}
        drafts.extend(held)
        held.clear()

    for element in elements:
        if element.kind == "image":
            (held if parts else drafts).append(Draft("image", page=element.page, image=element.image, context=element.context.strip(),
                                bbox=element.bbox, meta=dict(element.metadata), decoded=element.decoded))
            continue
        text = element.text.strip()
        n = next(counts)
        if not text:
            continue
        if element.kind == "title":
            emit(keep_tail=False)
            title, page = text, element.page
            continue
        if element.kind == "table":
            emit(keep_tail=False)
            for part in _split_table(text, n, tokenizer, max_tokens):
                prefix = f"{title}\n\n" if title else ""
                drafts.append(Draft("table", text=prefix + part, page=element.page,
                                    meta={"title": title} if title else {}))
            continue
        if element.metadata.get("notes"):
            extra["notes"] = True
        if n > max_tokens:
            emit(keep_tail=True)
            pieces = tokenizer.split_tokens(text, max_tokens, overlap)
            for piece in pieces[:-1]:
                parts, used, page = [piece], max_tokens, element.page if page is None else page
                emit(keep_tail=False)
                page = element.page
            parts, used, page = [pieces[-1]], tokenizer.count_tokens([pieces[-1]])[0], element.page
            continue
        if used + n > max_tokens:
            emit(keep_tail=True)
        if not parts or page is None:
            page = element.page
        parts.append(text)
        used += n
    emit(keep_tail=False)
    return drafts


def _orphan_titles_as_text(elements: Sequence[Element]) -> list[Element]:
    """A title with no text after it (another title follows, or the end) is content, not a heading: a PDF of
    headings only, or lines a layout heuristic took for titles, must not vanish."""
    out = list(elements)
    textual = [i for i, e in enumerate(out) if e.kind != "image" and e.text.strip()]
    for here, after in zip(textual, textual[1:] + [None]):
        if out[here].kind == "title" and (after is None or out[after].kind == "title"):
            out[here] = replace(out[here], kind="text")
    return out


def _split_table(text: str, tokens: int, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    if tokens <= max_tokens:
        return [text]
    rows = [r for r in text.splitlines() if r.strip()]
    if len(rows) <= 1:
        return tokenizer.split_tokens(text, max_tokens, 0)
    counts = tokenizer.count_tokens(rows)
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for row, n in zip(rows, counts):
        if current and used + n > max_tokens:
            parts.append("\n".join(current))
            current, used = [], 0
        if n > max_tokens:
            parts.extend(tokenizer.split_tokens(row, max_tokens, 0))
            continue
        current.append(row)
        used += n
    if current:
        parts.append("\n".join(current))
    return parts
