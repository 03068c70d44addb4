"""Citations in a generated answer: ``[n]`` markers mapped to the numbered sources the model was given.

- ``[2]``, ``[1, 3]``, ``[1][3]`` and ``[1-3]`` all cite; a marker naming a source that was not given (``[0]``,
  ``[9]`` of 5) is removed from the text and reported, never mapped to a chunk.
- Sentences are split on ., ! and ? (markers right after a sentence's full stop belong to that sentence). A sentence
  that states something (at least three words, or any digit) and cites no valid source is reported unsupported;
  so is one whose cited sources do not back it, when a support scorer is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from typing import TYPE_CHECKING

from generation.prompting import Source

if TYPE_CHECKING:
    from generation.support import SupportScorer

_MARKER = re.compile(r"\s*\[\s*(\d+(?:\s*(?:[,;]|-|–|and)\s*\d+)*)\s*\]")
_LEADING = re.compile(r"(?:\s*\[\s*\d[^\]]*\])+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass(frozen=True)
class Citation:
    marker: int
    chunk_id: str
    source: str
    page: int | None
    modality: str
    snippet: str


@dataclass(frozen=True)
class CitationCheck:
    text: str  # the answer with invalid markers removed
    citations: tuple[Citation, ...]  # each cited source once, in order of first citation
    removed: tuple[int, ...]  # markers naming sources that were not given
    unsupported: tuple[str, ...]  # sentences stating something without a valid citation
    sentences: tuple[tuple[str, tuple[int, ...]], ...]  # each sentence with the valid markers it carries


def _numbers(group: str) -> list[int]:
    numbers: list[int] = []
    for part in re.split(r"\s*(?:[,;]|and)\s*", group):
        bounds = re.split(r"\s*[-–]\s*", part)
        if len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            low, high = int(bounds[0]), int(bounds[1])
            numbers.extend(range(low, high + 1) if 0 < high - low < 20 else (low, high))
        elif part.isdigit():
            numbers.append(int(part))
    return numbers


def check_citations(answer: str, sources: tuple[Source, ...], *, scorer: "SupportScorer | None" = None,
                    min_support: float = 0.5) -> CitationCheck:
    """Map markers to sources. With a ``scorer``, a cited sentence whose cited sources score below
    ``min_support`` is reported unsupported too (its markers stay in the text)."""
    by_n = {s.n: s for s in sources}
    removed: list[int] = []

    def rewrite(match: re.Match[str]) -> str:
        numbers = _numbers(match.group(1))
        valid = [n for n in numbers if n in by_n]
        removed.extend(n for n in numbers if n not in by_n)
        if not valid:
            return ""
        return " [" + ", ".join(str(n) for n in dict.fromkeys(valid)) + "]"

    text = _MARKER.sub(rewrite, answer).strip()
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", text)  # "fact [9]." -> "fact."

    sentences: list[tuple[str, tuple[int, ...]]] = []
    for raw in _SENTENCE_END.split(text):
        lead = _LEADING.match(raw)
        if lead and sentences:  # "Fact. [1] Next.": the leading markers belong to the sentence before
            prev, prev_markers = sentences[-1]
            sentences[-1] = (f"{prev} {lead.group(0).strip()}", prev_markers + _markers(lead.group(0)))
            raw = raw[lead.end():]
        if raw.strip():
            sentences.append((raw.strip(), _markers(raw)))

    cited: dict[int, Citation] = {}
    unsupported: list[str] = []
    for sentence, markers in sentences:
        for n in markers:
            if n not in cited:
                s = by_n[n]
                cited[n] = Citation(n, s.chunk.id, s.hit.source, s.chunk.page, s.chunk.modality, s.snippet)
        if not states_something(sentence):
            continue
        if not markers:
            unsupported.append(sentence)
        elif scorer is not None:
            evidence = [by_n[n].text for n in dict.fromkeys(markers)]  # as the model was given them
            if scorer.score(_MARKER.sub("", sentence), evidence) < min_support:
                unsupported.append(sentence)
    return CitationCheck(text, tuple(cited.values()), tuple(dict.fromkeys(removed)), tuple(unsupported),
                         tuple(sentences))


def _markers(text: str) -> tuple[int, ...]:
    return tuple(n for m in _MARKER.finditer(text) for n in _numbers(m.group(1)))


def states_something(sentence: str) -> bool:
    """Whether a sentence makes a claim that needs a citation: three words or more, or any number."""
    words = _WORD.findall(_MARKER.sub("", sentence))
    return len(words) >= 3 or any(ch.isdigit() for ch in sentence)
