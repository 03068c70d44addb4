"""Plain text through unstructured's ``partition_text``, with a paragraph grouper for hard-wrapped text.

unstructured's automatic grouper treats a file with few blank lines as one paragraph per line, so a hard-wrapped
text (RFC-style, 72 columns) becomes hundreds of line fragments, many of them classified as titles. This grouper
joins wrapped lines into paragraphs: a blank line ends a paragraph, a line that starts a list item ("1.", "-",
"*", "•") starts one, and decoration lines ("-----", "=====", "*****") are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

from ingest.elements import Element, ParseOptions
from ingest.nlp import ensure_offline_nlp
from ingest.parsers._common import from_unstructured
from ingest.parsers._sniff import decode_text

_LIST_ITEM_RE = re.compile(r"^\s*(\d{1,3}[.)]|[a-zA-Z][.)]|[-*•·‣◦+])\s+\S")
_DECORATION_RE = re.compile(r"^\s*([^\w\s])\1{2,}\s*$|^\s*[_\-=*~#+.]{3,}\s*$")


def group_paragraphs(text: str) -> str:
    """One paragraph per line: wrapped lines joined, list items and blank-line breaks kept apart."""
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw_line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = raw_line.strip()
        if not line:
            flush()
            continue
        if _DECORATION_RE.match(line):
            flush()
            continue
        if _LIST_ITEM_RE.match(line):
            flush()
        current.append(line)
    flush()
    return "\n".join(paragraphs)


def partition_plain_text(text: str) -> list[Element]:
    """Elements of a plain text (titles, paragraphs, list items) through unstructured."""
    if not text.strip():
        return []
    ensure_offline_nlp()
    from unstructured.partition.text import partition_text

    return from_unstructured(partition_text(text=text, paragraph_grouper=group_paragraphs, languages=["eng"]))


def parse_text(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
    """A .txt file: decoded (BOM, UTF-8, detected charset), grouped into paragraphs, classified."""
    return partition_plain_text(decode_text(data))
