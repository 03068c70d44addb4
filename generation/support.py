"""Support scoring: how well a passage backs a sentence.

``LexicalSupportScorer`` is the offline backend that needs no weights: the share of the sentence's content words
(numbers included, stop words excluded, plural/singular folded) that appear in the passage. It is blind to
negation and paraphrase; a model-based scorer (an NLI cross-encoder) is the stronger choice where one is available.
"""

from __future__ import annotations

import re
from typing import Protocol

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOP = frozenset("""
a an the and or but if then than so of to in on at by for with from as into onto over under about after before
between through during without within is are was were be been being am do does did has have had having it its it's
this that these those there here which who whom whose what when where why how all any both each few more most other
some such no nor not only own same too very can could will would shall should may might must i you he she we they
me him her us them my your his our their also just one first new being up out off again further once
""".split())


class SupportScorer(Protocol):
    name: str

    def score(self, claim: str, evidence: list[str]) -> float:
        """Support of ``claim`` by the evidence passages, in [0, 1]."""
        ...


def content_words(text: str) -> set[str]:
    words = set()
    for word in _WORD.findall(text.lower()):
        if word in _STOP or (len(word) < 2 and not word.isdigit()):
            continue
        words.add(word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word)
    return words


class LexicalSupportScorer:
    name = "lexical"

    def score(self, claim: str, evidence: list[str]) -> float:
        wanted = content_words(claim)
        if not wanted:
            return 1.0
        have: set[str] = set()
        for passage in evidence:
            have |= content_words(passage)
        return len(wanted & have) / len(wanted)
