"""Image evaluation: a reference-guided picture per prompt with gold images, scored with CLIP.

``run_image_eval(runtime, records, out_dir)`` ingests nothing: the corpus is in ``runtime``'s knowledge base and the
records' gold image paths are absolute. Steps:
  1. check the records (every one needs gold images) and the models: the image generator
     (``models.image_generator``) and CLIP (``models.clip``; without its weights the pictures are still generated
     and listed, and the CLIP metrics are null);
  2. per record: retrieve with the profile's settings, generate the picture from that grounding
     (``generation.image.generate_images``, seeded, written under ``out_dir``), then score it
     (``generation.image_metrics``): CLIPScore against the prompt, CLIP-I against each gold image;
  3. aggregate (``DEFINITIONS``). A record whose picture fails is reported with its error; the others still run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eval import metrics
from eval.datasets import EvalRecord
from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["DEFINITIONS", "run_image_eval"]

DEFINITIONS: dict[str, str] = {
    "clip_score": "CLIPScore of a generated picture against its prompt: max(100 * cosine, 0) of their CLIP vectors "
                  "(torchmetrics' scale), averaged over the pictures; null without CLIP weights",
    "clip_i": "CLIP-I: the cosine between a generated picture's CLIP vector and each of its prompt's gold images, "
              "averaged per picture, then over the pictures; null without CLIP weights",
    "gold_reference_rate": "share of the pictures guided by at least one gold image (the retrieval found the right "
                           "reference and it passed the reference thresholds)",
    "failed": "prompts whose picture could not be made (the error is in the example)",
    "modes": "how many pictures each mode made (ip-adapter, img2img, text: no reference passed)",
    "latency_s": "seconds per picture: retrieval and generation, CLIP scoring excluded",
}


def _score(clip: Any, path: str, prompt: str, gold: Sequence[str]) -> dict[str, Any]:
    from generation.image_metrics import clip_i, clip_score

    if clip is None:
        return {"clip_score": None, "clip_i": None, "clip_i_mean": None}
    cosines = clip_i(clip, [path], [list(gold)])[0]
    return {"clip_score": round(clip_score(clip, [path], [prompt])[0], 4),
            "clip_i": [round(c, 4) for c in cosines],
            "clip_i_mean": round(metrics.mean(cosines), 4) if cosines else None}


def run_image_eval(runtime: Any, records: Sequence[EvalRecord], out_dir: Path, *, progress: bool = True,
                   done: Mapping[str, dict[str, Any]] | None = None,
                   on_example: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Generate and score a picture for every record; ``{"config", "definitions", "summary", "examples"}``.
    ``done`` / ``on_example`` resume and record a run as in ``eval.generation.run_generation_eval``."""
    from tqdm import tqdm

    from generation.image import ImageRequest, generate_images
    from retrieval.retriever import Query, Retriever

    # 1. Check inputs; load the models.
    chosen = list(records)
    if not chosen:
        raise BadInputError("no records to evaluate")
    without = [r.id for r in chosen if not r.gold_images]
    if without:
        raise BadInputError(f"{len(without)} record(s) have no gold_images (first: {without[0]!r}): image "
                            "evaluation scores pictures against them")
    generator = runtime.models.image_generator  # raises ModelUnavailableError naming what to configure
    clip = runtime.models.clip
    retriever = Retriever(runtime)
    done = {i: e for i, e in (done or {}).items() if i in {r.id for r in chosen}}
    folder = Path(out_dir)
    seed = runtime.settings.generation.seed

    # 2. Generate and score.
    finished: dict[str, dict[str, Any]] = dict(done)
    todo = [r for r in chosen if r.id not in done]
    desc = f"eval images ({len(done)} resumed)" if done else "eval images"
    for record in tqdm(todo, desc=desc, unit="prompt", disable=not progress, leave=False):
        start = time.perf_counter()
        grounding = retriever.retrieve(Query(text=record.prompt))
        outcome = generate_images(runtime, record.prompt, grounding, ImageRequest(out_dir=folder, seed=seed))
        seconds = time.perf_counter() - start
        sources = {h.chunk.id: h.source for h in grounding.image_hits}
        example: dict[str, Any] = {"id": record.id, "prompt": record.prompt, "gold": list(record.gold_images),
                                   "latency_s": round(seconds, 3), "notes": list(outcome.notes),
                                   "error": outcome.error_message, "image": None}
        if outcome.images:
            image = outcome.images[0]
            references = [sources.get(chunk, chunk) for chunk in image.references]
            example.update(image=image.path, mode=image.mode, references=references,
                           reference_is_gold=any(ref in record.gold_images for ref in references))
            try:
                example.update(_score(clip, image.path, record.prompt, record.gold_images))
            except BadInputError as exc:  # an unreadable picture or gold image: this example only
                example["error"] = str(exc)
        finished[record.id] = example
        if on_example is not None:
            on_example(record.id, example)

    # 3. Aggregate.
    examples = [finished[r.id] for r in chosen]
    made = [e for e in examples if e["image"]]
    scored = [e for e in made if e.get("clip_score") is not None]
    with_i = [e for e in scored if e.get("clip_i_mean") is not None]
    summary = {
        "n": len(examples), "generated": len(made), "failed": len(examples) - len(made),
        "clip_score": round(metrics.mean(e["clip_score"] for e in scored), 4) if scored else None,
        "clip_i": round(metrics.mean(e["clip_i_mean"] for e in with_i), 4) if with_i else None,
        "gold_reference_rate": round(sum(e["reference_is_gold"] for e in made) / len(made), 4) if made else None,
        "modes": dict(Counter(e["mode"] for e in made)),
        "latency_s": {"p50": round(metrics.percentile([e["latency_s"] for e in made], 50), 3)} if made else None,
    }
    config = {"records": len(chosen), "model": getattr(generator, "name", type(generator).__name__),
              "clip": None if clip is None else clip.signature.model, "seed": seed,
              "image": runtime.settings.image.model_dump(mode="json"), "out_dir": str(folder), "resumed": len(done)}
    return {"config": config, "definitions": DEFINITIONS, "summary": summary, "examples": examples}
