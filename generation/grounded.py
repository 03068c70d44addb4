"""Grounded text generation: retrieve, build the prompt, generate (streaming), check the citations.

    stream = GroundedGenerator(runtime).stream("When was the Mustang introduced?")
    for piece in stream:          # text as the model writes it
        print(piece, end="")
    result = stream.result        # GroundedText: cleaned text, citations, unsupported sentences, ...

When nothing retrieved passes the relevance threshold the answer abstains without calling the model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from generation.citations import Citation, check_citations
from generation.prompting import BuiltPrompt, PromptTemplate, Source, build_baseline_prompt, build_prompt
from generation.support import SupportScorer
from generation.text import Completion, SamplingParams
from mmrag.errors import MmragError
from mmrag.records import Grounding

if TYPE_CHECKING:
    from mmrag.runtime import Runtime
    from retrieval.retriever import Query


@dataclass(frozen=True)
class GroundedText:
    """A generated answer with its evidence. ``mmrag generate --json`` prints ``to_json()``."""

    text: str
    citations: tuple[Citation, ...] = ()
    unsupported: tuple[str, ...] = ()  # sentences that state something without citing a given source
    removed_citations: tuple[int, ...] = ()  # markers naming sources the model was not given
    abstained: bool = False
    # "no-grounding" (the model was not called) | "withheld" (every source passing the threshold was text addressed
    # to the model, kept out: the model was not called) | "model" (it declined)
    abstain_reason: str | None = None
    sources: tuple[Source, ...] = ()
    grounding: Grounding | None = None
    model: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    images: tuple[Any, ...] = ()  # generation.image.GeneratedImage records
    image_notes: tuple[str, ...] = ()  # skipped references, mode fallbacks, why no image was made
    image_error: str | None = None  # what stopped image generation (the text is unaffected)
    # Sources with text addressed to the model, kept out of the prompt (generation.prompting.withheld_text);
    # marker 0: the source had nothing else and was not given.
    withheld: tuple[Source, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "citations": [{"marker": c.marker, "chunk_id": c.chunk_id, "source": c.source, "page": c.page,
                           "modality": c.modality, "snippet": c.snippet} for c in self.citations],
            "unsupported": list(self.unsupported),
            "abstained": self.abstained,
            "images": [image.to_json() if hasattr(image, "to_json") else image for image in self.images],
            "removed_citations": list(self.removed_citations),
            "abstain_reason": self.abstain_reason,
            "sources": [{"marker": s.n, "chunk_id": s.chunk.id, "source": s.hit.source, "page": s.chunk.page,
                         "modality": s.chunk.modality, "score": s.hit.score} for s in self.sources],
            "model": self.model,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "image_notes": list(self.image_notes),
            "image_error": self.image_error,
            "withheld": [{"marker": s.n, "chunk_id": s.chunk.id, "source": s.hit.source, "text": list(s.withheld)}
                         for s in self.withheld],
        }

    def with_images(self, outcome: Any) -> "GroundedText":
        """This answer with the images (and notes, error) of a ``generation.image.ImageOutcome``."""
        return dataclasses.replace(self, images=tuple(outcome.images), image_notes=tuple(outcome.notes),
                                   image_error=outcome.error_message)


class GenerationStream:
    """An iterator of text pieces; ``result`` is the checked ``GroundedText`` once the iterator is exhausted."""

    def __init__(self, pieces: Iterator[str], finish) -> None:
        self._pieces = pieces
        self._finish = finish
        self._result: GroundedText | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces
        self._result = self._finish()

    def close(self) -> None:
        """Stop generating (e.g. the client went away)."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    @property
    def result(self) -> GroundedText:
        if self._result is None:
            for _ in self:
                pass
        assert self._result is not None
        return self._result


class GroundedGenerator:
    """Grounded answers over one runtime's knowledge base and models."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self.settings = runtime.settings.generation
        self.template = PromptTemplate.load(self.settings.template)

    @property
    def scorer(self) -> SupportScorer:
        """The support scorer that checks citations: the profile's ``models.support_scorer`` (the same one
        evaluation uses), the lexical scorer when none is configured. Loaded once per runtime, on first use."""
        return self.runtime.models.support_scorer

    def params(self, *, max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None) -> SamplingParams:
        s = self.settings
        params = SamplingParams(
            max_new_tokens=s.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=s.temperature if temperature is None else temperature,
            top_p=s.top_p if top_p is None else top_p,
            seed=s.seed if seed is None else seed,
            stop=tuple(s.stop if stop is None else stop),
            repetition_penalty=s.repetition_penalty,
        )
        if params.max_new_tokens < 1 or params.temperature < 0 or not 0 < params.top_p <= 1:
            raise MmragError("max tokens must be >= 1, temperature >= 0 and top_p in (0, 1]")
        return params

    def retrieve(self, query: "Query") -> Grounding:
        from retrieval.retriever import Retriever

        return Retriever(self.runtime).retrieve(query)

    def stream(self, prompt: str, *, query: "Query | None" = None, grounding: Grounding | None = None,
               params: SamplingParams | None = None) -> GenerationStream:
        """Retrieve (unless a grounding is given) and stream a grounded answer."""
        from retrieval.retriever import Query

        started = time.perf_counter()
        if grounding is None:
            grounding = self.retrieve(query or Query(text=prompt))
        retrieve_s = time.perf_counter() - started
        params = params or self.params()
        if not grounding.grounded:
            return self._abstain(grounding, retrieve_s)
        self.scorer  # noqa: B018 - a scorer that cannot load fails here, before the model writes anything
        llm = self.runtime.models.llm
        built = build_prompt(self.template, grounding, prompt, llm, max_source_chars=self.settings.max_source_chars,
                             max_prompt_tokens=self.settings.max_prompt_tokens,
                             withhold_instructions=self.settings.withhold_instructions)
        if not built.sources and built.withheld:  # every source was an instruction to the model: nothing to answer from
            return self._abstain(grounding, retrieve_s, reason="withheld", withheld=built.withheld)
        # A model that starts writing the source block's tags is echoing the prompt, not answering: stop there.
        params = dataclasses.replace(params, stop=tuple(dict.fromkeys((*params.stop, "<sources>", "</sources>",
                                                                       "<source"))))
        # The decoder picks each sentence's source lexically whatever scorer is configured (generation.text._Citer
        # says why); the configured scorer judges the finished answer's citations once, in finish().
        if self.settings.citation_mode == "constrained" and built.sources:
            params = dataclasses.replace(params, cite_evidence=tuple(
                s.text for s in built.sources))
        return self._run(built, grounding, params, retrieve_s, started)

    def stream_baseline(self, prompt: str, params: SamplingParams | None = None) -> GenerationStream:
        """The same model and settings without retrieval (the baseline of evaluation runs)."""
        started = time.perf_counter()
        llm = self.runtime.models.llm
        built = build_baseline_prompt(self.template, prompt, llm)
        return self._run(built, None, params or self.params(), 0.0, started)

    def generate(self, prompt: str, **kwargs: Any) -> GroundedText:
        return self.stream(prompt, **kwargs).result

    def images(self, prompt: str, grounding: Grounding | None, request: Any = None) -> Any:
        """Reference-guided images for the prompt from the same grounding (``generation.image.generate_images``);
        returns an ``ImageOutcome`` whose error, if any, never affects the text."""
        from generation.image import generate_images

        return generate_images(self.runtime, prompt, grounding, request)

    # -- internals --------------------------------------------------------------------------------------------
    def _abstain(self, grounding: Grounding, retrieve_s: float, reason: str = "no-grounding",
                 withheld: tuple[Source, ...] = ()) -> GenerationStream:
        text = self.template.abstain

        def pieces() -> Iterator[str]:
            yield text

        def finish() -> GroundedText:
            return GroundedText(text=text, abstained=True, abstain_reason=reason, grounding=grounding,
                                finish_reason="abstained", usage={"retrieve_s": round(retrieve_s, 4),
                                                                  "prompt_tokens": 0, "completion_tokens": 0},
                                withheld=withheld)

        return GenerationStream(pieces(), finish)

    def _run(self, built: BuiltPrompt, grounding: Grounding | None, params: SamplingParams, retrieve_s: float,
             started: float) -> GenerationStream:
        llm = self.runtime.models.llm
        completion = Completion()
        pieces = llm.stream(built.rendered, params, completion)

        def finish() -> GroundedText:
            usage = {
                "retrieve_s": round(retrieve_s, 4),
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "first_token_s": round(completion.first_token_s, 4) if completion.first_token_s else None,
                "generate_s": round(completion.total_s, 4),
                "total_s": round(time.perf_counter() - started, 4),
                "tokens_per_s": round(completion.tokens_per_s, 2) if completion.tokens_per_s else None,
                "sources_dropped": built.dropped,
            }
            answer = completion.text.strip()
            declined = any(answer.lower().startswith(m.lower()) for m in self.template.abstain_markers)
            if grounding is None:  # baseline: nothing to cite
                return GroundedText(text=answer, model=llm.name, finish_reason=completion.finish_reason, usage=usage)
            if declined:
                return GroundedText(text=answer, abstained=True, abstain_reason="model", sources=built.sources,
                                    grounding=grounding, model=llm.name, finish_reason=completion.finish_reason,
                                    usage=usage, withheld=built.withheld)
            checked = check_citations(answer, built.sources, scorer=self.scorer,
                                      min_support=self.settings.min_support)
            return GroundedText(text=checked.text, citations=checked.citations, unsupported=checked.unsupported,
                                removed_citations=checked.removed, sources=built.sources, grounding=grounding,
                                model=llm.name, finish_reason=completion.finish_reason, usage=usage,
                                withheld=built.withheld)

        return GenerationStream(pieces, finish)
