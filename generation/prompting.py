"""The grounded prompt: an instruction, the numbered sources delimited as data, the user's prompt last.

The template is data (``mmrag/profiles/prompts/NAME.toml`` or any TOML file the profile names), never code. Source
text and the user's prompt are cleaned before they go in: the source block's delimiters and the model's control
tokens (chat turn markers, end of text) are removed, so a retrieved document cannot close its block, open a new
chat turn or pose as the system; whatever it says stays inside the user turn, as data.

A small model does not reliably keep data apart from instructions, whatever the prompt says, so sources are also
checked for text addressed to the model (``withheld_text``; ``generation.withhold_instructions``, on by default):
the part of a source from a control token or a source delimiter on (a forged turn or a closed source block), and
sentences that instruct the assistant (ignore the previous instructions, reply only with, never cite, print the
other sources ...) are kept out of the prompt. The stored chunk is unchanged; the answer lists what was withheld,
and a source with nothing left is not given to the model.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmrag.config import PROFILES_DIR
from mmrag.errors import BadInputError, ConfigError
from mmrag.records import Grounding, Hit

if TYPE_CHECKING:
    from generation.text import TextGenerator

_FIELDS = ("system", "user", "passage", "image", "page", "source_separator", "abstain", "abstain_markers",
           "baseline_system", "baseline_user", "examples")


@dataclass(frozen=True)
class PromptTemplate:
    system: str
    user: str
    passage: str
    image: str
    page: str = ", page {page}"
    source_separator: str = "\n\n"
    abstain: str = "The knowledge base does not cover this."
    abstain_markers: tuple[str, ...] = ()
    baseline_system: str = "You are a helpful assistant. Answer the question briefly."
    baseline_user: str = "Question: {prompt}"
    # Worked examples shown as earlier chat turns ([{user = ..., assistant = ...}]): small models copy the citation
    # format from an example far more reliably than from an instruction.
    examples: tuple[dict[str, str], ...] = ()
    origin: str = ""

    @classmethod
    def load(cls, name: str) -> "PromptTemplate":
        """A built-in template by name, or a TOML file by path."""
        path = Path(name).expanduser()
        if not (path.suffix == ".toml" or path.is_file()):
            path = PROFILES_DIR / "prompts" / f"{name}.toml"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            known = sorted(p.stem for p in (PROFILES_DIR / "prompts").glob("*.toml"))
            raise ConfigError(f"prompt template {name!r} not found (built-in: {', '.join(known)}; "
                              "or give a path to a .toml file)") from exc
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read prompt template {path}: {exc}") from exc
        unknown = sorted(set(data) - set(_FIELDS))
        missing = [f for f in ("system", "user", "passage", "image") if f not in data]
        if unknown or missing:
            raise ConfigError(f"prompt template {path}: " + "; ".join(
                ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])))
        if "{sources}" not in data["user"] or "{prompt}" not in data["user"]:
            raise ConfigError(f"prompt template {path}: `user` must contain {{sources}} and {{prompt}}")
        examples = data.get("examples", [])
        if not all(isinstance(e, dict) and set(e) == {"user", "assistant"} for e in examples):
            raise ConfigError(f"prompt template {path}: each of `examples` needs exactly `user` and `assistant`")
        data["examples"] = tuple(examples)
        data["abstain_markers"] = tuple(data.get("abstain_markers", ())) or (data.get("abstain", cls.abstain),)
        return cls(**data, origin=str(path))


@dataclass(frozen=True)
class Source:
    """A numbered source as the model saw it."""

    n: int
    hit: Hit
    withheld: tuple[str, ...] = ()  # its text kept out of the prompt: instructions to the model (``withheld_text``)
    shown: str | None = None  # its text without the withheld parts (None: nothing was withheld)

    @property
    def chunk(self):
        return self.hit.chunk

    @property
    def text(self) -> str:
        """The source's text as the model was given it (its withheld parts left out)."""
        return self.chunk.search_text if self.shown is None else self.shown

    @property
    def snippet(self) -> str:
        text = self.chunk.search_text
        return " ".join(text.split())[:200]


@dataclass(frozen=True)
class BuiltPrompt:
    messages: list[dict[str, str]]
    sources: tuple[Source, ...]
    dropped: int = 0  # sources left out to fit the prompt budget
    rendered: str = ""
    tokens: int = 0
    notes: list[str] = field(default_factory=list)
    # Sources with text kept out of the prompt (``withheld_text``); those left empty were not given (marker 0).
    withheld: tuple[Source, ...] = ()


_DELIMITERS = re.compile(r"<\s*/?\s*sources?\s*>", re.IGNORECASE)


def clean(text: str, control_tokens: list[str]) -> str:
    """Text as data: no source-block delimiters, no control tokens of the model's vocabulary."""
    for token in control_tokens:
        text = text.replace(token, " ")
    # Removing one piece can join the halves of another ("<|im_<|im_end|>start|>"): repeat until stable.
    previous = None
    while previous != text:
        previous = text
        for token in control_tokens:
            text = text.replace(token, " ")
        text = _DELIMITERS.sub(" ", text)
    return text.strip()


# Sentences that speak to the model instead of about the world. Each pattern is a common prompt-injection form;
# none matches ordinary prose about a subject (benchmarks/injection.py counts what they withhold from a corpus of
# real passages).
_INSTRUCTION = re.compile("|".join((
    # ignore / disregard / forget the previous instructions (or the question, the other sources)
    r"\b(?:ignore|disregard|forget|override)\b[^.]{0,40}?\b(?:previous|prior|above|earlier|preceding|all|any|"
    r"other|the|your)\b[^.]{0,30}?\b(?:instructions?|prompts?|rules|directions|guidelines|sources|context|"
    r"questions?)\b",
    # the assistant / the model must ...
    r"\b(?:assistant|chatbot|language model|AI model|LLM)s?\b[^.]{0,40}?\b(?:must|should|shall|will|needs? to|"
    r"has to|is (?:required|instructed|asked|expected) to)\b",
    # new instructions: / system notice / instruction to the assistant
    r"\b(?:new|updated|additional|revised|overriding|system|admin(?:istrator)?|developer)\s+(?:instructions?|"
    r"directives?|commands?|notice|prompt|message)\b",
    r"\binstructions?\s+(?:to|for)\s+(?:the\s+)?(?:assistant|AI|model|chatbot|LLM)\b",
    # you are now ... / your only reply
    r"\byou are now\b",
    r"\byour\s+(?:only|sole|new|first|next)\s+(?:reply|answer|response|task|role|output)\b",
    r"\byour\s+(?:reply|answer|response|output)\s+(?:must|should|shall|will|may only)\b",
    r"\bthe answer to (?:every|any|all|each) questions?\b",
    # reply only with / answer with exactly
    r"\b(?:reply|respond|answer)\b[^.]{0,30}?\b(?:only|exactly|solely)\b[^.]{0,20}?(?:\bwith\b|:|['\"])",
    # never cite / do not write numbers in square brackets
    r"\b(?:never|do not|don't|must not)\s+(?:cite|write|use|include|add|mention)\b[^.]{0,40}?\b(?:sources?|"
    r"citations?|brackets|references)\b",
    # print / reveal the other sources, the system prompt, the restricted memo
    r"\b(?:print|repeat|reveal|output|disclose|leak|dump)\b[^.]{0,40}?\b(?:every other source|(?:all|every|the) "
    r"other sources|all (?:the )?sources|system prompt|your instructions|(?:restricted|confidential|internal) "
    r"(?:memo|document|source|note)s?)\b",
)), re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def withheld_text(text: str, control_tokens: Sequence[str] = ()) -> tuple[str, tuple[str, ...]]:
    """``text`` without what speaks to the model, and what was left out: everything from the first control token
    or source delimiter on (a forged chat turn or a closed source block: the rest of the chunk is the attack), then
    each sentence that instructs the assistant (``_INSTRUCTION``)."""
    withheld: list[str] = []
    cut = min([i for i in [text.find(t) for t in control_tokens if t] if i >= 0]
              + [m.start() for m in [_DELIMITERS.search(text)] if m], default=-1)
    if cut >= 0:
        tail = " ".join(text[cut:].split())
        if tail:
            withheld.append(tail)
        text = text[:cut]
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        if _INSTRUCTION.search(sentence):
            withheld.append(" ".join(sentence.split()))
        else:
            kept.append(sentence)
    if not withheld:
        return text, ()
    return " ".join(part.strip() for part in kept if part.strip()), tuple(withheld)


def _render_source(template: PromptTemplate, source: Source, control: list[str], max_chars: int) -> str:
    chunk = source.chunk
    page = template.page.format(page=chunk.page) if chunk.page is not None else ""
    name = Path(source.hit.source).name if source.hit.source else chunk.doc_id
    body = clean(source.text, control)
    if len(body) > max_chars:
        body = body[:max_chars].rsplit(" ", 1)[0] + " ..."
    fmt = template.image if chunk.modality == "image" else template.passage
    return fmt.format(n=source.n, source=clean(name, control), page=page, id=chunk.id, text=body, context=body)


def build_prompt(template: PromptTemplate, grounding: Grounding, prompt: str, generator: "TextGenerator", *,
                 max_source_chars: int, max_prompt_tokens: int, with_images: bool = True,
                 withhold_instructions: bool = True) -> BuiltPrompt:
    """The chat messages for a grounded answer; sources that do not fit the budget are dropped, lowest first.

    ``withhold_instructions``: keep text addressed to the model out of the sources (``withheld_text``); a source
    left with nothing is not given (``BuiltPrompt.withheld`` keeps it, so the answer can say so)."""
    control = generator.special_tokens()
    question = clean(prompt, control)
    if not question:
        raise BadInputError("the prompt is empty")
    hits = list(grounding.text_hits) + (list(grounding.image_hits) if with_images else [])
    sources: list[Source] = []
    emptied: list[Source] = []
    for hit in hits:
        shown, withheld = withheld_text(hit.chunk.search_text, control) if withhold_instructions else ("", ())
        if withheld and not clean(shown, control):
            emptied.append(Source(0, hit, withheld, ""))
        else:
            sources.append(Source(len(sources) + 1, hit, withheld, shown if withheld else None))
    rendered_sources = [_render_source(template, s, control, max_source_chars) for s in sources]
    dropped = 0
    while True:
        block = template.source_separator.join(rendered_sources)
        messages = [{"role": "system", "content": template.system}]
        for example in template.examples:
            messages += [{"role": "user", "content": example["user"]},
                         {"role": "assistant", "content": example["assistant"]}]
        messages.append({"role": "user", "content": template.user.format(sources=block, prompt=question)})
        rendered = generator.render(messages)
        tokens = generator.count_tokens(rendered)
        if tokens <= max_prompt_tokens or not rendered_sources:
            break
        # Drop the lowest-ranked passage (images, ranked separately, go before passages).
        rendered_sources.pop()
        sources.pop()
        dropped += 1
    if tokens > max_prompt_tokens:
        raise BadInputError(f"the prompt alone takes {tokens} tokens, over the budget of {max_prompt_tokens} "
                            "(generation.max_prompt_tokens)")
    withheld = tuple(s for s in sources if s.withheld) + tuple(emptied)
    return BuiltPrompt(messages, tuple(sources), dropped, rendered, tokens, withheld=withheld)


def build_baseline_prompt(template: PromptTemplate, prompt: str, generator: "TextGenerator") -> BuiltPrompt:
    """The same model without retrieval: the baseline of evaluation runs."""
    question = clean(prompt, generator.special_tokens())
    if not question:
        raise BadInputError("the prompt is empty")
    messages = [{"role": "system", "content": template.baseline_system},
                {"role": "user", "content": template.baseline_user.format(prompt=question)}]
    rendered = generator.render(messages)
    return BuiltPrompt(messages, (), 0, rendered, generator.count_tokens(rendered))
