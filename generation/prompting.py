"""The grounded prompt: an instruction, the numbered sources delimited as data, the user's prompt last.

The template is data (``mmrag/profiles/prompts/NAME.toml`` or any TOML file the profile names), never code. Source
text and the user's prompt are cleaned before they go in: the source block's delimiters and the model's control
tokens (chat turn markers, end of text) are removed, so a retrieved document cannot close its block, open a new
chat turn or pose as the system; whatever it says stays inside the user turn, as data.
"""

from __future__ import annotations

import re
import tomllib
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

    @property
    def chunk(self):
        return self.hit.chunk

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


def _render_source(template: PromptTemplate, source: Source, control: list[str], max_chars: int) -> str:
    chunk = source.chunk
    page = template.page.format(page=chunk.page) if chunk.page is not None else ""
    name = Path(source.hit.source).name if source.hit.source else chunk.doc_id
    body = clean(chunk.search_text, control)
    if len(body) > max_chars:
        body = body[:max_chars].rsplit(" ", 1)[0] + " ..."
    fmt = template.image if chunk.modality == "image" else template.passage
    return fmt.format(n=source.n, source=clean(name, control), page=page, id=chunk.id, text=body, context=body)


def build_prompt(template: PromptTemplate, grounding: Grounding, prompt: str, generator: "TextGenerator", *,
                 max_source_chars: int, max_prompt_tokens: int, with_images: bool = True) -> BuiltPrompt:
    """The chat messages for a grounded answer; sources that do not fit the budget are dropped, lowest first."""
    control = generator.special_tokens()
    question = clean(prompt, control)
    if not question:
        raise BadInputError("the prompt is empty")
    hits = list(grounding.text_hits) + (list(grounding.image_hits) if with_images else [])
    sources = [Source(i, hit) for i, hit in enumerate(hits, 1)]
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
    return BuiltPrompt(messages, tuple(sources), dropped, rendered, tokens)


def build_baseline_prompt(template: PromptTemplate, prompt: str, generator: "TextGenerator") -> BuiltPrompt:
    """The same model without retrieval: the baseline of evaluation runs."""
    question = clean(prompt, generator.special_tokens())
    if not question:
        raise BadInputError("the prompt is empty")
    messages = [{"role": "system", "content": template.baseline_system},
                {"role": "user", "content": template.baseline_user.format(prompt=question)}]
    rendered = generator.render(messages)
    return BuiltPrompt(messages, (), 0, rendered, generator.count_tokens(rendered))
