"""Offline stand-in for the spaCy model that ``unstructured`` wants.

unstructured 0.27.x classifies text (title vs narrative text) with spaCy's ``en_core_web_sm`` and downloads that
model on first use. Offline the download fails: most partitioners raise ``RuntimeError: Failed to download spaCy
model`` and ``partition_pdf(strategy="fast")`` swallows the error and returns no elements at all.

``ensure_offline_nlp()`` keeps the real model when it is installed. Otherwise it points unstructured at a blank
English pipeline with a rule-based sentencizer plus a small lexical "verb hint" component: unstructured calls text
without a verb "not narrative" (and short verb-less lines become titles), and a blank pipeline tags nothing, so
without hints nearly every one-sentence paragraph would turn into a title. The hints mark auxiliaries, modals, a
list of frequent verbs and ``-ed``/``-ing`` forms, and treat a line of three or more words ending in "." or "!" as
having a verb; it is a heuristic, not a tagger.

Nothing happens at import; the patch is applied on the first call and is idempotent.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

REAL_MODEL = "en_core_web_sm"
BLANK_MODEL = "blank-en"
_HINTS_COMPONENT = "mmrag_verb_hints"

_lock = threading.Lock()
_state: str | None = None

# Closed-class verbs (auxiliaries, modals) and frequent lexical verbs, with their common inflections.
_AUX = {
    "am": "VBP", "is": "VBZ", "are": "VBP", "was": "VBD", "were": "VBD", "be": "VB", "been": "VBN",
    "being": "VBG", "has": "VBZ", "have": "VBP", "had": "VBD", "having": "VBG", "do": "VBP", "does": "VBZ",
    "did": "VBD", "'s": "VBZ", "'re": "VBP", "'m": "VBP", "'ve": "VBP", "'d": "VBD",
    "will": "VB", "would": "VB", "can": "VB", "could": "VB", "shall": "VB", "should": "VB", "may": "VB",
    "might": "VB", "must": "VB", "ca": "VB", "wo": "VB",
}
_COMMON_VERBS = (
    "accept add agree allow appear apply ask become begin believe belong bring build buy call carry cause change"
    " choose come consider contain continue create cut decide define describe design develop die distribute do"
    " draw drive eat enable end ensure exist expect explain fall feel fight find follow forget form get give go"
    " grow happen hear help hold include increase indicate install invent involve keep kill know lead learn leave"
    " let lie like live look lose love make mean meet move need offer open pay play produce promise provide pull"
    " push put reach read receive release remain remember replace report represent require return run say see"
    " seem sell send serve set show sit speak spend stand start stay stop support take talk teach tell tend"
    " think try turn understand use wait walk want watch win wish work write"
).split()
_IRREGULAR = (
    "became began believed brought built bought came chose chosen did done drew drawn drove driven ate eaten fell"
    " fallen felt fought found forgot forgotten gave given went gone grew grown heard held kept knew known led"
    " left lay lain lost made meant met paid put read ran said saw seen sold sent set sat spoke spoken spent stood"
    " took taken taught told thought understood won wrote written"
).split()


def _verb_tag(lower: str) -> str | None:
    """A Penn-Treebank-like verb tag for a lower-cased token, or None when it does not look like a verb."""
    if lower in _AUX:
        return _AUX[lower]
    if lower in _IRREGULAR:
        return "VBD"
    if lower in _VERB_FORMS:
        return _VERB_FORMS[lower]
    if len(lower) > 4 and lower.isalpha():
        if lower.endswith("ing"):
            return "VBG"
        if lower.endswith("ed"):
            return "VBD"
    return None


def _inflections(verb: str) -> dict[str, str]:
    forms = {verb: "VB"}
    third = verb + "es" if verb.endswith(("s", "sh", "ch", "x", "o")) else verb + "s"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        third = verb[:-1] + "ies"
    forms[third] = "VBZ"
    return forms


_VERB_FORMS: dict[str, str] = {}
for _verb in _COMMON_VERBS:
    _VERB_FORMS.update(_inflections(_verb))


def _verb_hints(doc):  # type: ignore[no-untyped-def]  # a spaCy pipeline component: Doc -> Doc
    found = False
    for token in doc:
        tag = _verb_tag(token.lower_)
        if tag is not None:
            token.tag_ = tag
            found = True
    if not found:
        _sentence_hint(doc)
    return doc


def _sentence_hint(doc) -> None:  # type: ignore[no-untyped-def]
    """A line of three or more words that ends in "." or "!" reads as a sentence, so it surely has a verb the
    word lists missed ("Apples outsold pears."): tag its first lower-case word as one, as a tagger would tag
    the real verb. Lines without final punctuation (headings, labels) are left alone."""
    words = [token for token in doc if token.is_alpha]
    stripped = doc.text.rstrip().rstrip("\"')]»”’")
    if len(words) < 3 or not stripped.endswith((".", "!")) or stripped.endswith(".."):
        return
    for token in words[1:]:
        if token.is_lower:
            token.tag_ = "VB"
            return


def _blank_pipeline():  # type: ignore[no-untyped-def]  # -> spacy.language.Language
    import spacy
    from spacy.language import Language

    if not Language.has_factory(_HINTS_COMPONENT):
        Language.component(_HINTS_COMPONENT, func=_verb_hints)
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.add_pipe(_HINTS_COMPONENT)
    return nlp


def ensure_offline_nlp() -> str:
    """Make unstructured's NLP work without a network; returns the pipeline in use.

    Returns ``"en_core_web_sm"`` when that spaCy package is installed (nothing is changed), else ``"blank-en"``
    after replacing ``unstructured.nlp.tokenize._load_spacy_model`` with a loader of the blank pipeline (so
    unstructured never tries to download the model) and clearing its cached pipeline.
    """
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        import spacy.util

        if spacy.util.is_package(REAL_MODEL):
            _state = REAL_MODEL
            return _state
        import unstructured.nlp.tokenize as tokenize

        tokenize._load_spacy_model = _blank_pipeline
        tokenize._get_nlp.cache_clear()
        for cached in ("_process_cached", "word_tokenize", "pos_tag", "_tokenize_for_cache"):
            func = getattr(tokenize, cached, None)
            if func is not None and hasattr(func, "cache_clear"):
                func.cache_clear()
        logger.info("spaCy model %s is not installed: unstructured uses a blank English pipeline", REAL_MODEL)
        _state = BLANK_MODEL
        return _state
