"""Generation evaluation: every record answered from the knowledge base (retrieve + grounded generation), optionally
by the same model without retrieval (the baseline), and questions the knowledge base cannot answer, which should
abstain.

``run_generation_eval(runtime, records, unanswerable=..., baseline=...)`` ingests nothing: the caller has put the
corpus into ``runtime``'s knowledge base, made the records' gold paths absolute (``eval.datasets.resolve_gold``) and
set ``generation.max_new_tokens`` (decoding dominates the cost). Steps:
  1. check the records: every answerable one needs a gold answer and gold sources (absolute paths);
  2. warm up: load the LLM and run one 2-token generation and one retrieval, not counted;
  3. per answerable record, a grounded answer (``GroundedGenerator.generate`` with the profile's retrieval), then
     with ``baseline`` the same model, prompt template family and sampling settings without retrieval
     (``stream_baseline``); then every unanswerable record, grounded only;
  4. score each answer (``DEFINITIONS``) and aggregate.

Latency is the wall-clock time of one answer: retrieval, prompt building and decoding (for an answer that abstains
because nothing passed the relevance threshold, retrieval alone).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eval import metrics
from eval.datasets import EvalRecord
from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["DEFINITIONS", "check_support", "run_generation_eval", "score_answer", "strip_citations"]

DEFINITIONS: dict[str, str] = {
    "accuracy": "share of answerable questions whose answer contains the gold answer (both normalised: lower case, "
                "no punctuation, no articles, single spaces; matched on word boundaries, citation markers removed "
                "first); an abstention counts as wrong",
    "token_f1": "mean SQuAD token F1 between the normalised answer and gold answer over answerable questions; an "
                "abstention scores 0",
    "accuracy_answered / token_f1_answered": "the same over the answers that did not abstain",
    "citation_precision": "over every valid citation of every answer (each cited [n] once per answer): the share "
                          "whose chunk belongs to a gold source (for HaluEval: the question's own knowledge passage); "
                          "null when no answer cites anything",
    "citation_recall": "share of the answers that did not abstain which cite a chunk of a gold source",
    "gold_in_sources": "share of the answers that did not abstain whose prompt held a chunk of a gold source "
                       "(the ceiling of citation_recall)",
    "unsupported_sentence_rate": "unsupported sentences / all sentences over the answers that did not abstain; a "
                                "sentence is unsupported when it states something (3+ words or a digit) and cites no "
                                "given source, or its cited sources share less than generation.min_support of its "
                                "content words (generation.citations)",
    "answers_with_unsupported": "share of the answers that did not abstain with at least one unsupported sentence",
    "abstention_rate": "share of questions answered with an abstention; by_reason splits it into 'no-grounding' "
                       "(no retrieved passage passed retrieval.threshold, the model was not called) and 'model' (the "
                       "model declined with the template's abstain sentence)",
    "unanswerable": "questions whose passages are not in the knowledge base (HaluEval: later questions whose "
                    "knowledge passage was not ingested); abstaining is the right behaviour there",
    "latency_s": "wall-clock seconds per answer (retrieval + prompt + decoding); p50 is the median",
    "faithfulness": "per answer that did not abstain: the share of its checked sentences (those with at least one "
                    "content word, citation markers removed) that the support scorer (models.support_scorer) scores "
                    "at least generation.min_support against their evidence; averaged over the answers with a "
                    "checked sentence. Evidence: for a grounded answer, the passages a sentence cites, or every "
                    "passage the model was given when it cites none; for the baseline, the passages retrieval finds "
                    "for the same prompt (would the knowledge base back what the model said on its own?)",
    "hallucination_rate": "share of the answers that did not abstain with at least one checked sentence the "
                          "support scorer does not support (see faithfulness)",
    "support scores": "every checked sentence's score, kept per example under 'support' (the report's plots show "
                      "their distribution)",
}

_MARKERS = re.compile(r"\s*\[\s*\d+(?:\s*(?:[,;]|-|–|and)\s*\d+)*\s*\]")


def strip_citations(text: str) -> str:
    """The answer without its ``[n]`` markers (they are not part of what it says)."""
    return _MARKERS.sub("", text).strip()


def score_answer(answer: str, gold: str) -> dict[str, float]:
    """Containment and token F1 of an answer (citation markers removed) against the gold answer."""
    text = strip_citations(answer)
    return {"correct": metrics.answer_contains(text, gold), "f1": round(metrics.token_f1(text, gold), 4)}


def check_support(scorer: Any, sentences: Sequence[tuple[str, list[str]]], threshold: float,
                  ) -> list[dict[str, Any]]:
    """Each (sentence, evidence passages) scored by the support scorer; sentences without a content word are not
    checked. One entry per checked sentence: ``{"sentence", "score", "supported"}``."""
    from generation.support import content_words, score_pairs

    checked = [(strip_citations(sentence), evidence) for sentence, evidence in sentences]
    checked = [(sentence, evidence) for sentence, evidence in checked if content_words(sentence)]
    scores = score_pairs(scorer, checked) if checked else []
    return [{"sentence": sentence, "score": round(float(score), 4), "supported": bool(score >= threshold)}
            for (sentence, _), score in zip(checked, scores)]


def _faithfulness(support: list[dict[str, Any]]) -> float | None:
    value = metrics.faithfulness([s["supported"] for s in support])
    return None if value is None else round(value, 4)


def _rag_support(result: Any, scorer: Any, threshold: float) -> list[dict[str, Any]]:
    """A grounded answer's sentences against the passages they cite, or every given passage when uncited."""
    from generation.citations import check_citations

    by_n = {s.n: s.chunk.search_text for s in result.sources}
    every = list(by_n.values())
    items = []
    for sentence, markers in check_citations(result.text, result.sources).sentences:
        cited = [by_n[n] for n in dict.fromkeys(markers) if n in by_n]
        items.append((sentence, cited or every))
    return check_support(scorer, items, threshold)


def _baseline_support(text: str, evidence: list[str], scorer: Any, threshold: float) -> list[dict[str, Any]]:
    from generation.citations import check_citations

    return check_support(scorer, [(sentence, evidence) for sentence, _ in check_citations(text, ()).sentences],
                         threshold)


def _support_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Faithfulness and hallucination rate over the entries that did not abstain."""
    answered = [e for e in entries if not e.get("abstained") and "support" in e]
    values = [e["faithfulness"] for e in answered if e["faithfulness"] is not None]
    rate = metrics.hallucination_rate([[s["supported"] for s in e["support"]] for e in answered])
    return {"faithfulness": round(metrics.mean(values), 4) if values else None,
            "hallucination_rate": None if rate is None else round(rate, 4),
            "checked_sentences": sum(len(e["support"]) for e in answered)}


def _latency(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"p50": round(metrics.percentile(values, 50), 3), "p95": round(metrics.percentile(values, 95), 3),
            "mean": round(metrics.mean(values), 3)}


def _rate(part: float, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _check(records: Sequence[EvalRecord], unanswerable: Sequence[EvalRecord]) -> None:
    if not records:
        raise BadInputError("no records to evaluate")
    ids = [r.id for r in (*records, *unanswerable)]
    if len(set(ids)) != len(ids):
        raise BadInputError("record ids must be unique (answerable and unanswerable together)")
    for record in records:
        if not record.gold_answer or not metrics.normalize_answer(record.gold_answer):
            raise BadInputError(f"record {record.id!r} has no gold answer: generation evaluation scores answers "
                                "against one (evaluate retrieval alone with --retrieval-only)")
        if not (record.gold_sources or record.gold_images):
            raise BadInputError(f"record {record.id!r} has no gold sources or gold images: generation evaluation "
                                "needs to know which files answer each prompt")
        relative = [g for g in (*record.gold_sources, *record.gold_images) if not Path(g).is_absolute()]
        if relative:
            raise BadInputError(f"record {record.id!r}: gold paths must be absolute (resolve them against the "
                                f"corpus root with eval.datasets.resolve_gold), got {relative[0]!r}")


def _grounded_entry(result: Any, gold: frozenset[str], seconds: float, record: EvalRecord) -> dict[str, Any]:
    from generation.citations import check_citations

    entry: dict[str, Any] = {
        "text": result.text, "abstained": result.abstained, "abstain_reason": result.abstain_reason,
        "latency_s": round(seconds, 3), "completion_tokens": result.usage.get("completion_tokens", 0),
        "finish_reason": result.finish_reason,
        "sources": [{"marker": s.n, "source": s.hit.source, "score": s.hit.score,
                     "dense": s.hit.scores.get("dense"), "gold": s.hit.source in gold} for s in result.sources],
    }
    grounding = result.grounding
    if grounding is not None and grounding.text_hits:
        entry["best_dense"] = max((h.scores.get("dense", -1.0) for h in grounding.text_hits), default=None)
    if result.abstained:
        entry.update(correct=0.0, f1=0.0)
        return entry
    if record.gold_answer:
        entry.update(score_answer(result.text, record.gold_answer))
    # Sentences split the way the citation check splits them (the answer's markers are valid ones by now).
    sentences = check_citations(result.text, result.sources).sentences
    entry.update(
        citations=[{"marker": c.marker, "source": c.source, "chunk_id": c.chunk_id, "gold": c.source in gold}
                   for c in result.citations],
        cited_gold=any(c.source in gold for c in result.citations),
        gold_in_sources=any(s.hit.source in gold for s in result.sources),
        sentences=len(sentences), unsupported=list(result.unsupported),
        removed_citations=list(result.removed_citations),
    )
    return entry


def _abstentions(entries: list[dict[str, Any]]) -> dict[str, Any]:
    reasons = Counter(e["abstain_reason"] for e in entries if e["abstained"])
    n = len(entries)
    return {"abstention_rate": _rate(sum(reasons.values()), n),
            "abstained": {"no-grounding": reasons.get("no-grounding", 0), "model": reasons.get("model", 0)},
            "by_reason": {"no-grounding": _rate(reasons.get("no-grounding", 0), n),
                          "model": _rate(reasons.get("model", 0), n)}}


def _rag_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(entries)
    answered = [e for e in entries if not e["abstained"]]
    citations = [c for e in answered for c in e["citations"]]
    sentences = sum(e["sentences"] for e in answered)
    unsupported = sum(len(e["unsupported"]) for e in answered)
    generated = [e["latency_s"] for e in entries if e["abstain_reason"] != "no-grounding"]
    summary: dict[str, Any] = {
        "n": n,
        "accuracy": round(metrics.mean(e["correct"] for e in entries), 4),
        "token_f1": round(metrics.mean(e["f1"] for e in entries), 4),
        "answered": len(answered),
        "accuracy_answered": round(metrics.mean(e["correct"] for e in answered), 4) if answered else None,
        "token_f1_answered": round(metrics.mean(e["f1"] for e in answered), 4) if answered else None,
        "citation_precision": _rate(sum(c["gold"] for c in citations), len(citations)),
        "citations": len(citations),
        "citation_recall": _rate(sum(e["cited_gold"] for e in answered), len(answered)),
        "gold_in_sources": _rate(sum(e["gold_in_sources"] for e in answered), len(answered)),
        "answers_with_citations": sum(1 for e in answered if e["citations"]),
        "unsupported_sentence_rate": _rate(unsupported, sentences),
        "sentences": sentences,
        "unsupported_sentences": unsupported,
        "answers_with_unsupported": _rate(sum(1 for e in answered if e["unsupported"]), len(answered)),
        "removed_citations": sum(len(e["removed_citations"]) for e in answered),
        **_abstentions(entries),
        "latency_s": _latency([e["latency_s"] for e in entries]),
        "latency_s_model_called": _latency(generated),
        "completion_tokens_mean": round(metrics.mean(e["completion_tokens"] for e in entries), 1),
    }
    return summary


def _unanswerable_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    answered = [e for e in entries if not e["abstained"]]
    return {
        "n": len(entries), **_abstentions(entries), "answered": len(answered),
        "answered_with_citations": sum(1 for e in answered if e.get("citations")),
        # Answered anyway, and right: the model knew it, or another passage held it.
        "answered_correctly": sum(1 for e in answered if e.get("correct")),
        "latency_s": _latency([e["latency_s"] for e in entries]),
    }


def run_generation_eval(runtime: Any, records: Sequence[EvalRecord], *,
                        unanswerable: Sequence[EvalRecord] = (), baseline: bool = False,
                        progress: bool = True, done: Mapping[str, dict[str, Any]] | None = None,
                        on_example: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate grounded generation over ``records`` (answerable from the knowledge base already in ``runtime``),
    the no-retrieval ``baseline`` on the same records, and abstention on ``unanswerable`` records.

    ``done`` maps record ids to examples an earlier, interrupted attempt of the same run finished (they are not
    answered again); ``on_example(id, example)`` is called as each new example finishes.

    Returns ``{"config", "definitions", "rag", "baseline" (with ``baseline``), "unanswerable" (when given),
    "examples"}``; the metrics are defined in ``DEFINITIONS``."""
    from tqdm import tqdm

    from generation.grounded import GroundedGenerator
    from retrieval.retriever import Query

    # 1. Check inputs.
    chosen, held_out = list(records), list(unanswerable)
    _check(chosen, held_out)
    if runtime.index.count() == 0:
        raise BadInputError(f"knowledge base {runtime.settings.milvus.collection!r} is empty: ingest the corpus "
                            "before evaluating generation")
    work = [(r, True) for r in chosen] + [(r, False) for r in held_out]
    wanted = {r.id for r, _ in work}
    done = {i: e for i, e in (done or {}).items() if i in wanted and ("baseline" in e) == (baseline and e.get(
        "answerable", False))}
    todo = [(r, answerable) for r, answerable in work if r.id not in done]

    # 2. Warm up: the LLM's load and first forward pass, and the first search, are not an answer's latency.
    generator = GroundedGenerator(runtime)
    params = generator.params()
    llm = runtime.models.llm
    scorer = runtime.models.support_scorer
    threshold = runtime.settings.generation.min_support
    if todo:
        generator.stream_baseline(todo[0][0].prompt, generator.params(max_new_tokens=2)).result
        generator.retrieve(Query(text=todo[0][0].prompt))

    # 3. Answer.
    finished: dict[str, dict[str, Any]] = dict(done)
    desc = f"eval generation ({len(done)} resumed)" if done else "eval generation"
    for record, answerable in tqdm(todo, desc=desc, unit="prompt", disable=not progress, leave=False):
        gold = frozenset((*record.gold_sources, *record.gold_images))
        start = time.perf_counter()
        result = generator.generate(record.prompt, query=Query(text=record.prompt), params=params)
        entry = _grounded_entry(result, gold, time.perf_counter() - start, record)
        if not result.abstained:
            entry["support"] = _rag_support(result, scorer, threshold)
            entry["faithfulness"] = _faithfulness(entry["support"])
        example: dict[str, Any] = {"id": record.id, "prompt": record.prompt, "gold_answer": record.gold_answer,
                                   "answerable": answerable, "gold": sorted(gold), "rag": entry}
        if answerable and baseline:
            start = time.perf_counter()
            plain = generator.stream_baseline(record.prompt, params).result
            seconds = time.perf_counter() - start
            hits = result.grounding.text_hits if result.grounding is not None else ()
            evidence = [h.chunk.search_text for h in hits[:runtime.settings.retrieval.k_text]]
            support = _baseline_support(plain.text, evidence, scorer, threshold)
            example["baseline"] = {"text": plain.text, "latency_s": round(seconds, 3),
                                   "completion_tokens": plain.usage.get("completion_tokens", 0),
                                   **score_answer(plain.text, record.gold_answer or ""),
                                   "abstained": False, "support": support, "faithfulness": _faithfulness(support),
                                   "evidence": [h.source for h in hits[:runtime.settings.retrieval.k_text]]}
        finished[record.id] = example
        if on_example is not None:
            on_example(record.id, example)
        if len(finished) % 10 == 0 or len(finished) == len(work):
            logger.info("answered %d/%d prompts", len(finished), len(work))

    # 4. Aggregate, from the examples (resumed ones included), in record order.
    examples = [finished[r.id] for r, _ in work]
    rag_entries = [e["rag"] for e in examples if e["answerable"]]
    base_entries = [e["baseline"] for e in examples if e["answerable"] and "baseline" in e]
    result_data: dict[str, Any] = {"rag": _rag_summary(rag_entries) | _support_summary(rag_entries)}
    if baseline:
        result_data["baseline"] = {
            "n": len(base_entries),
            "accuracy": round(metrics.mean(e["correct"] for e in base_entries), 4),
            "token_f1": round(metrics.mean(e["f1"] for e in base_entries), 4),
            **_support_summary(base_entries),
            "latency_s": _latency([e["latency_s"] for e in base_entries]),
            "completion_tokens_mean": round(metrics.mean(e["completion_tokens"] for e in base_entries), 1),
        }
    if held_out:
        result_data["unanswerable"] = _unanswerable_summary([e["rag"] for e in examples if not e["answerable"]])
    rag = result_data["rag"]
    logger.info("rag: accuracy %.3f, F1 %.3f, abstained %.3f", rag["accuracy"], rag["token_f1"],
                rag["abstention_rate"] or 0.0)
    s = runtime.settings
    config = {
        "records": len(chosen), "unanswerable": len(held_out), "baseline": baseline,
        "model": llm.name, "decoder": llm.decoder_name, "template": generator.template.origin,
        "citation_mode": s.generation.citation_mode,
        "sampling": {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                     "top_p": params.top_p, "seed": params.seed, "repetition_penalty": params.repetition_penalty,
                     "stop": list(params.stop)},
        "max_source_chars": s.generation.max_source_chars, "max_prompt_tokens": s.generation.max_prompt_tokens,
        "support_scorer": getattr(scorer, "name", type(scorer).__name__), "min_support": s.generation.min_support,
        "citation_support_scorer": generator.scorer.name,
        "retrieval": {"mode": "hybrid", "k_text": s.retrieval.k_text, "k_image": s.retrieval.k_image,
                      "threshold": s.retrieval.threshold,
                      "reranker": None if runtime.models.reranker is None else type(runtime.models.reranker).__name__},
        "resumed": len(done),
    }
    return {"config": config, "definitions": DEFINITIONS, **result_data, "examples": examples}
