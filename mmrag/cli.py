"""The ``mmrag`` command line: ingest, delete, stats, models.

Global options come before the command: ``mmrag --data-dir DIR --profile NAME --milvus-uri URI COMMAND ...``.
Errors print one line (what went wrong, what to do) and exit with the code ``mmrag.errors.EXIT_CODES`` gives.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mmrag.config import load_settings
from mmrag.errors import MmragError, exit_code

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Grounded multimodal generation over a Milvus knowledge base.")
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)
logger = logging.getLogger("mmrag")


class _State:
    settings_kwargs: dict[str, Any] = {}
    verbose: bool = False


@app.callback()
def main_options(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="MMRAG_DATA_DIR",
                                            help="Where the embedded Milvus and blobs live [default: ./mmrag-data]"),
    profile: Optional[str] = typer.Option(None, "--profile", envvar="MMRAG_PROFILE",
                                          help="Built-in profile name or path to a .toml profile [default: default]"),
    milvus_uri: Optional[str] = typer.Option(None, "--milvus-uri", envvar="MMRAG_MILVUS_URI",
                                             help="Milvus server URI, e.g. http://localhost:19530 [default: embedded]"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details and show tracebacks."),
) -> None:
    kwargs: dict[str, Any] = {"data_dir": data_dir, "profile": profile}
    if milvus_uri:
        kwargs["milvus"] = {"uri": milvus_uri}
    _State.settings_kwargs = kwargs
    _State.verbose = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # milvus-lite's in-process gRPC server logs pymilvus' optional calls it does not implement as errors.
        for noisy in ("httpx", "urllib3", "pymilvus", "sentence_transformers", "unstructured", "PIL"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("mmrag").setLevel(logging.WARNING)
        logging.getLogger("ingest").setLevel(logging.ERROR)
        logging.getLogger("grpc").setLevel(logging.CRITICAL)
        import pymilvus  # noqa: F401 - it configures its own loggers on import; quiet them after that

        for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite"):  # errors reach the user as StoreError
            logging.getLogger(name).setLevel(logging.CRITICAL)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _runtime():
    from mmrag.runtime import Runtime

    return Runtime(load_settings(**_State.settings_kwargs))


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(_utf8(data), indent=2, ensure_ascii=False) + "\n")


def _utf8(value: Any) -> Any:
    """JSON-ready data whose strings all encode as UTF-8: the undecodable bytes of a file name (lone surrogates
    from the file system) become ``\\udcXX`` text, the way ingest's failure reasons name such files."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_utf8(key): _utf8(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_utf8(item) for item in value]
    return value


def _one_line(text: str, limit: int | None = None) -> str:
    """A document's or the model's text as one line: whitespace runs (newlines included) become one space."""
    return " ".join(text.split())[:limit]


@app.command()
def ingest(
    paths: list[Path] = typer.Argument(..., help="Files or folders (walked recursively)."),
    sync: bool = typer.Option(False, "--sync", help="Also remove what disappeared from the given folders."),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="Tenant the documents belong to."),
    include: list[str] = typer.Option([], "--include", help="Only files matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip files matching this glob (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Ingest documents and images; unchanged sources are skipped, changed ones replaced."""
    from mmrag.records import to_dict

    runtime = _runtime()
    if include or exclude:
        section = runtime.settings.ingest
        runtime.settings.ingest = section.model_copy(update={
            "include": list(section.include) + include, "exclude": list(section.exclude) + exclude})
    with runtime:
        if runtime.models.clip is None and not as_json:
            err.print("note: no CLIP weights found; images are indexed through their context text "
                      "(`mmrag models` says what to configure)", highlight=False, markup=False)
        report = runtime.ingestor.ingest(paths, sync=sync, tenant=tenant, progress=sys.stderr.isatty() and not as_json)
    data = to_dict(report)
    if as_json:
        _print_json(data)
    else:
        table = Table(title="ingest")
        for column in ("added", "updated", "unchanged", "deleted", "failed", "text chunks", "image chunks"):
            table.add_column(column, justify="right")
        table.add_row(*(str(v) for v in (report.added, report.updated, report.unchanged, report.deleted,
                                          len(report.failed), report.chunks["text"], report.chunks["image"])))
        out.print(table)
        for failure in report.failed:
            err.print(f"[red]failed[/red] {failure.source}: {failure.reason}", highlight=False, markup=True)
    if report.failed:
        raise typer.Exit(1)


@app.command()
def delete(
    docs: list[str] = typer.Argument(None, help="Document ids or source paths."),
    tenant: Optional[str] = typer.Option(None, "--tenant"),
    all_: bool = typer.Option(False, "--all", help="Delete the whole knowledge base."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask before --all."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete documents (their chunks, record and unreferenced images), or the whole knowledge base."""
    with _runtime() as runtime:
        tenant = tenant or runtime.settings.tenant
        if all_:
            if not yes and not typer.confirm(f"Delete knowledge base {runtime.settings.milvus.collection!r}?"):
                raise typer.Exit(1)
            runtime.index.delete_all()
            removed = runtime.blobs.sweep(set())
            result = {"deleted": "all", "blobs_removed": removed}
        else:
            if not docs:
                raise MmragError("name at least one document id or source path, or --all")
            known = {d.source: d.doc_id for d in runtime.index.documents(tenant)}
            ids = []
            for doc in docs:
                path = str(Path(doc).expanduser().resolve())
                ids.append(known.get(path, known.get(doc, doc)))
            result = {"deleted": runtime.ingestor.delete(ids, tenant)}
    if as_json:
        _print_json(result)
    else:
        out.print(f"deleted {result['deleted']}")


@app.command()
def stats(
    tenant: Optional[str] = typer.Option(None, "--tenant", help="Only this tenant [default: every tenant]."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What the knowledge base holds."""
    with _runtime() as runtime:
        data = runtime.index.stats(tenant)
        data["blobs"] = sum(1 for _ in runtime.blobs.keys())
        data["blob_store"] = runtime.settings.blob_url
    if as_json:
        _print_json(data)
        return
    table = Table(title=f"knowledge base {data['knowledge_base']}", show_header=False)
    for key in ("milvus_uri", "blob_store", "documents"):
        table.add_row(key, str(data[key]))
    for modality, count in data["chunks"].items():
        table.add_row(f"{modality} chunks", str(count))
    table.add_row("blobs", str(data["blobs"]))
    for role, sig in data["encoders"].items():
        table.add_row(f"{role} encoder", f"{sig['model']} ({sig['dim']}-d)" if sig else "none")
    out.print(table)


def grounding_json(grounding: Any, blobs: Any) -> dict[str, Any]:
    """The shape ``mmrag search --json`` prints (the HTTP API returns the same, see ``mmrag.api.shapes``)."""
    from mmrag.api.shapes import grounding_json as shape

    return shape(grounding, lambda hit: blobs.url_of(hit.chunk.blob))


@app.command()
def search(
    text: str = typer.Argument("", help="What to search for (may be empty with --image)."),
    image: Optional[Path] = typer.Option(None, "--image", help="An image to search with (image->image, image->text)."),
    k_text: Optional[int] = typer.Option(None, "--k-text", help="Passages to return [default: the profile's]."),
    k_image: Optional[int] = typer.Option(None, "--k-image", help="Reference images to return."),
    filter_: Optional[str] = typer.Option(None, "--filter", help='e.g. \'modality == "table" and page >= 3\'.'),
    tenant: Optional[str] = typer.Option(None, "--tenant"),
    mode: str = typer.Option("hybrid", "--mode", help="hybrid | dense | bm25"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Find the passages and reference images that ground a prompt, with their scores."""
    from mmrag.errors import BadInputError
    from retrieval.retriever import Query, Retriever

    data = None
    if image is not None:
        try:
            data = image.read_bytes()
        except OSError as exc:
            raise BadInputError(f"cannot read image {image}: {exc.strerror or exc}") from exc
    with _runtime() as runtime:
        grounding = Retriever(runtime).retrieve(Query(text=text or None, image=data, k_text=k_text, k_image=k_image,
                                                      filter=filter_, tenant=tenant, mode=mode))  # type: ignore[arg-type]
        result = grounding_json(grounding, runtime.blobs)
    if as_json:
        _print_json(result)
        return

    def scores(hit: dict[str, Any]) -> str:
        return " ".join(f"{k}={v:.3f}" for k, v in hit["scores"].items())

    table = Table(title=f"passages for {text!r}" if text else "passages")
    for column in ("#", "source", "page", "score", "signals", "text"):
        table.add_column(column, overflow="fold")
    for i, hit in enumerate(result["text"], 1):
        table.add_row(str(i), Path(hit["source"]).name, str(hit["page"] or "-"), f"{hit['score']:.3f}", scores(hit),
                      _one_line(hit["text"], 160))
    out.print(table)
    if result["images"]:
        table = Table(title="reference images")
        for column in ("#", "source", "page", "score", "signals", "context", "blob"):
            table.add_column(column, overflow="fold")
        for i, hit in enumerate(result["images"], 1):
            table.add_row(str(i), Path(hit["source"]).name, str(hit["page"] or "-"), f"{hit['score']:.3f}",
                          scores(hit), _one_line(hit["context"], 120), hit["blob"])
        out.print(table)
    if not result["grounded"]:
        out.print("nothing passed the relevance threshold: a generation would abstain")


@app.command("eval")
def eval_(
    dataset: list[str] = typer.Argument(..., metavar="DATASET", help='"halueval", "tuxpaint", or a path to a .jsonl '
                                        'eval set; or `compare A B`: the metric deltas between two runs (report.json '
                                        'files or run folders).'),
    retrieval_only: bool = typer.Option(False, "--retrieval-only",
                                        help="Evaluate retrieval alone (no LLM, no answers)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="halueval: the QA .jsonl; tuxpaint: the folder "
                                          "with captions.jsonl and images/; a .jsonl set: the folder to ingest."),
    baseline: bool = typer.Option(False, "--baseline", help="Also answer every question with the same model and "
                                  "settings without retrieval, and score those answers."),
    unanswerable: int = typer.Option(0, "--unanswerable", metavar="N", help="halueval: also ask N later questions "
                                     "whose passages are not ingested, to measure abstention."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N records (and their corpus)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="At most this many new tokens per answer."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: ./mmrag-eval/NAME-TIME); a "
                                           "rerun with the same folder and configuration resumes it."),
    detector: bool = typer.Option(False, "--detector", help="halueval: measure the support scorer as a "
                                  "hallucination detector (right vs hallucinated answers), raw and in one sentence "
                                  "form."),
    fail_under: list[str] = typer.Option([], "--fail-under", metavar="METRIC=VALUE", help="Exit 9 when METRIC is "
                                         "below VALUE (repeatable), e.g. retrieval.hybrid.recall@5=0.9."),
    fail_over: list[str] = typer.Option([], "--fail-over", metavar="METRIC=VALUE", help="Exit 9 when METRIC is "
                                        "above VALUE (repeatable), e.g. rag.hallucination_rate=0.3."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard an earlier run in --out instead of resuming it."),
    images: bool = typer.Option(False, "--images", help="Also generate a picture per prompt with gold images and "
                                "score it (CLIPScore to the prompt, CLIP-I to the gold images); needs "
                                "models.image_generator."),
    as_json: bool = typer.Option(False, "--json", help="Print the report's summary as JSON."),
) -> None:
    """Evaluate retrieval and grounded generation on an eval set, in a knowledge base of its own; writes
    report.json and report.html (metric definitions included). `mmrag eval compare A B` prints B - A."""
    from eval.cli import compare_command, compare_table, eval_command, merge_overrides, summary_table
    from eval.gate import EXIT_GATE_FAILED
    from mmrag.errors import BadInputError
    from mmrag.runtime import Runtime

    if dataset[0] == "compare":
        if len(dataset) != 3:
            raise BadInputError("usage: mmrag eval compare A B (two report.json files or run folders)")
        result = compare_command(Path(dataset[1]), Path(dataset[2]))
        if as_json:
            _print_json(result)
        else:
            out.print(compare_table(result))
        return
    if len(dataset) != 1:
        raise BadInputError(f"mmrag eval takes one DATASET, got {len(dataset)}: {' '.join(dataset)!r} (to compare "
                            "two runs: mmrag eval compare A B)")

    def runtime_factory(**overrides: Any) -> Any:
        return Runtime(load_settings(**merge_overrides(_State.settings_kwargs, overrides)))

    outcome = eval_command(runtime_factory, dataset[0], corpus, limit, out_dir, retrieval_only, as_json,
                           baseline=baseline, unanswerable=unanswerable, max_new_tokens=max_new_tokens,
                           detector=detector, fail_under=fail_under, fail_over=fail_over, fresh=fresh,
                           images=images)
    for note in outcome.notes:
        err.print(f"note: {note}", highlight=False, markup=False)
    if as_json:
        _print_json(outcome.summary)
    else:
        out.print(summary_table(outcome))
        out.print(f"report: {outcome.path} (and report.html)", highlight=False, markup=False)
    if outcome.failed_gates:
        for gate in outcome.failed_gates:
            err.print(f"gate failed: {gate['rule']}: {gate['reason']}", highlight=False, markup=False)
        raise typer.Exit(EXIT_GATE_FAILED)


SAMPLE_KB = Path(__file__).resolve().parent / "sample_kb"


DEMO_PROMPT = "When was the Ford Mustang introduced, and what did it look like?"


@app.command()
def demo(as_json: bool = typer.Option(False, "--json", help="Print the ingest report, grounding and answer as JSON."),
         ) -> None:
    """The main job on the embedded defaults: ingest the bundled sample knowledge base, then answer a prompt from
    it with citations."""
    from generation.grounded import GroundedGenerator
    from mmrag.records import to_dict
    from retrieval.retriever import Query

    runtime = _runtime()
    section = runtime.settings.ingest
    # The pictures come in through the documents that show them (with their alt text and captions).
    runtime.settings.ingest = section.model_copy(update={
        "exclude": list(section.exclude) + ["images/*", "LICENSE.md"]})
    with runtime:
        report = runtime.ingestor.ingest([SAMPLE_KB], sync=True, progress=sys.stderr.isatty() and not as_json)
        data = runtime.index.stats(runtime.settings.tenant)
        clip = runtime.models.resolution("clip")
        generator = GroundedGenerator(runtime)
        grounding = generator.retrieve(Query(text=DEMO_PROMPT, k_text=3, k_image=1))
        stream = generator.stream(DEMO_PROMPT, grounding=grounding)
        if as_json:
            answer = stream.result
            _print_json({"ingest": to_dict(report), "stats": data, "prompt": DEMO_PROMPT,
                         "grounding": grounding_json(grounding, runtime.blobs), "answer": answer.to_json()})
        else:
            out.print(f"Sample knowledge base: {SAMPLE_KB}")
            out.print(f"Ingested into {runtime.settings.milvus_uri} (blobs in {runtime.settings.blob_url}): "
                      f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged; "
                      f"{data['chunks']['text'] + data['chunks']['table']} text and {data['chunks']['image']} image "
                      f"chunks from {data['documents']} documents.")
            if not clip.available:
                out.print("CLIP weights are not available offline, so images are searchable through their context "
                          "text (`mmrag models` says what to configure).")
            out.print(f"\nPrompt: {DEMO_PROMPT}\nAnswer ({runtime.models.llm.name}): ", end="")
            _write_stream(stream)
            answer = stream.result
            out.print()
            _print_sources(answer)
            for hit in grounding.image_hits:
                out.print(f"Reference image: {_one_line(hit.chunk.context)}\n"
                          f"  {runtime.blobs.url_of(hit.chunk.blob)}", highlight=False, markup=False, soft_wrap=True)
    if report.failed:
        for failure in report.failed:
            err.print(f"failed {failure.source}: {failure.reason}", highlight=False, markup=False)
        raise typer.Exit(1)

@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The question or instruction to answer from the knowledge base."),
    image: Optional[bool] = typer.Option(None, "--image/--no-image", help="--image: also generate a reference-guided "
                                         "image, and fail (after the text) when image generation is unavailable; "
                                         "--no-image: text only [default: an image when an image generator is "
                                         "available]."),
    references: Optional[int] = typer.Option(None, "--references", metavar="N", help="At most N reference images "
                                             "guide the picture [default: the profile's image.references]."),
    image_mode: Optional[str] = typer.Option(None, "--mode", help="auto | ip-adapter | img2img | text [default: the "
                                             "profile's image.mode]."),
    image_dir: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Where images go [default: "
                                             "<data dir>/images]."),
    k_text: Optional[int] = typer.Option(None, "--k-text", help="Passages to ground on [default: the profile's]."),
    k_image: Optional[int] = typer.Option(None, "--k-image", help="Reference images to ground on."),
    filter_: Optional[str] = typer.Option(None, "--filter", help="Restrict the sources (see `mmrag search`)."),
    tenant: Optional[str] = typer.Option(None, "--tenant"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="At most this many new tokens."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 (default): greedy."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed, for the text and the image (same seed, "
                                       "same answer, same picture)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop at this string (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer, citations, sources and images as JSON."),
) -> None:
    """Answer from the knowledge base with [n] citations (abstain when nothing relevant is found), and draw a
    picture guided by the retrieved reference images."""
    from generation.grounded import GroundedGenerator
    from generation.image import MODES, ImageRequest
    from mmrag.errors import BadInputError
    from retrieval.retriever import Query

    if image_mode is not None and image_mode not in MODES:
        raise BadInputError(f"unknown --mode {image_mode!r}: use one of {', '.join(MODES)}")
    if references is not None and references < 0:
        raise BadInputError(f"--references must be >= 0, got {references}")
    with _runtime() as runtime:
        generator = GroundedGenerator(runtime)
        params = generator.params(max_new_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop)
        want_images = image if image is not None else runtime.models.resolution("image_generator").available
        if want_images and references is not None:  # retrieve at least as many images as may guide the picture
            k_image = max(k_image if k_image is not None else runtime.settings.retrieval.k_image, references)
        query = Query(text=prompt, k_text=k_text, k_image=k_image,
                      filter=filter_, tenant=tenant)
        stream = generator.stream(prompt, query=query, params=params)
        if not as_json:
            _write_stream(stream)  # tokens as they come
        result = stream.result
        if want_images:
            request = ImageRequest(mode=image_mode, references=references, seed=seed,  # type: ignore[arg-type]
                                   out_dir=image_dir, progress=sys.stderr.isatty() and not as_json)
            outcome = generator.images(prompt, result.grounding, request)
            result = result.with_images(outcome)
            image_failure = outcome.error
        else:
            image_failure = None
    if as_json:
        _print_json(result.to_json())
    else:
        out.print()
        _print_sources(result)
        _print_images(result, insisted=bool(image))
    if image and image_failure is not None:  # --image insisted: the text is out, the exit code says why no image
        if as_json:
            err.print(f"error: no image: {image_failure}", highlight=False, markup=False)
        raise typer.Exit(exit_code(image_failure))


def _print_images(result: Any, *, insisted: bool) -> None:
    for image in result.images:
        guided = (f"guided by {len(image.references)} reference image(s): {', '.join(image.references)}"
                  if image.references else "from the prompt alone")
        out.print(f"\nImage ({image.mode}, seed {image.seed}, {guided}):\n  {image.path}", highlight=False,
                  markup=False)
        out.print(f"  image prompt: {image.enriched_prompt}", highlight=False, markup=False)
    for note in result.image_notes:
        if insisted or result.images:
            err.print(f"note: {note}", highlight=False, markup=False)
    if result.image_error:
        err.print(f"{'error' if insisted else 'note'}: no image: {result.image_error}", highlight=False,
                  markup=False)


def _write_stream(pieces: Any) -> None:
    """Write streamed text as it comes, holding back trailing whitespace: an answer that ends in blank lines (the
    model's text before a stop string) does not push the sources away from it."""
    held = ""
    for piece in pieces:
        text = held + piece
        body = text.rstrip()
        held = text[len(body):]
        if body:
            out.file.write(body)
            out.file.flush()


def _print_sources(result: Any) -> None:
    for source in result.withheld:  # before anything else: the user should know the knowledge base holds these
        where = f"source [{source.n}]" if source.n else "a source (not given: nothing else in it)"
        err.print(f"note: withheld from {where}, {Path(source.hit.source).name}: text addressed to the model: "
                  f"{_one_line(' | '.join(source.withheld), 160)}", highlight=False, markup=False, soft_wrap=True)
    if result.abstained:
        reason = {"no-grounding": "nothing in the knowledge base passed the relevance threshold",
                  "withheld": "every relevant source was text addressed to the model, withheld"}.get(
            result.abstain_reason, "the model found no answer in the sources")
        out.print(f"(abstained: {reason})", highlight=False)
        return
    # One line per entry, never wrapped at the console's width, so `grep` and scripts see whole entries.
    if result.citations:
        out.print("\nSources:")
        for c in result.citations:
            page = f", page {c.page}" if c.page is not None else ""
            out.print(f"  [{c.marker}] {Path(c.source).name}{page}: {_one_line(c.snippet, 140)}", highlight=False,
                      markup=False, soft_wrap=True)
    if result.removed_citations:
        out.print(f"removed citations of sources that were not given: {list(result.removed_citations)}",
                  highlight=False)
    if result.unsupported:
        out.print("Not supported by a cited source:")
        for sentence in result.unsupported:
            out.print(f"  - {_one_line(sentence)}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def models(as_json: bool = typer.Option(False, "--json")) -> None:
    """What each model role resolves to, and whether it is available offline."""
    from mmrag.models import describe_models

    settings = load_settings(**_State.settings_kwargs)
    resolutions = describe_models(settings)
    if as_json:
        _print_json([{"role": r.role, "configured": r.configured, "source": r.source, "location": r.location,
                      "available": r.available, "optional": r.optional, "note": r.note} for r in resolutions])
    else:
        _models_table(settings.profile, resolutions)
    if any(r.configured and not r.available and not r.optional for r in resolutions):
        raise typer.Exit(4)


def _models_table(profile: str, resolutions: list) -> None:
    table = Table(title=f"models (profile {profile})")
    for column in ("role", "offline", "from", "resolves to"):
        table.add_column(column, overflow="fold")
    for r in resolutions:
        status = "[green]yes[/green]" if r.available else ("[yellow]no[/yellow]" if r.optional else "[red]no[/red]")
        table.add_row(r.role, status, r.source, r.location or "-")
    out.print(table)
    for r in resolutions:
        note = r.note
        if r.role == "clip" and not r.available:
            note += ". Images are still ingested and found through their context text."
        out.print(f"{r.role}: {note}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (auth must be on for non-loopback)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    workers: int = typer.Option(1, "--workers", min=1, help="Worker processes (more than one needs a Milvus "
                                                            "server: --milvus-uri)."),
) -> None:
    """Serve the HTTP API and the playground page (models load once per worker, at start)."""
    from mmrag.api.auth import Authenticator, is_loopback
    from mmrag.errors import ConfigError

    settings = load_settings(**_State.settings_kwargs)
    auth = Authenticator(settings)  # auth on without keys is a ConfigError naming `mmrag api-key`
    if not auth.enabled and not is_loopback(host):
        raise ConfigError(f"refusing to serve on {host} without API keys: add keys under [api] keys "
                          "(`mmrag api-key --tenant NAME` prints one), or bind --host 127.0.0.1")
    if workers > 1 and settings.milvus.uri is None:
        raise ConfigError(f"--workers {workers} needs a Milvus server: the embedded milvus-lite admits one process "
                          "per data dir. Pass --milvus-uri http://HOST:19530 (docker compose up -d milvus), or "
                          "serve with --workers 1")
    import uvicorn

    if not auth.enabled:
        err.print("note: API keys are off; serving loopback clients only", highlight=False, markup=False)
    err.print(f"mmrag API and playground on http://{host}:{port}/ (docs at /docs)", highlight=False, markup=False)
    if workers == 1:
        from mmrag.api.app import create_app

        uvicorn.run(create_app(settings), host=host, port=port, log_level="info" if _State.verbose else "warning")
        return
    # Worker processes rebuild the same settings from the environment.
    given = _State.settings_kwargs
    if given.get("data_dir"):
        os.environ["MMRAG_DATA_DIR"] = str(given["data_dir"])
    if given.get("profile"):
        os.environ["MMRAG_PROFILE"] = str(given["profile"])
    os.environ["MMRAG_MILVUS__URI"] = str(settings.milvus.uri)
    uvicorn.run("mmrag.api.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="info" if _State.verbose else "warning")


@app.command("api-key")
def api_key(
    tenant: str = typer.Option("default", "--tenant", help="The tenant the key is bound to."),
    name: Optional[str] = typer.Option(None, "--name", help="A label for the key (logged, never the key)."),
    scheme: str = typer.Option("sha256", "--scheme", help="sha256 (random keys) or scrypt."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Make a new API key: prints the key (give it to the client) and the hash to put in the profile."""
    from mmrag.api.auth import hash_key, new_key

    key = new_key()
    hashed = hash_key(key, scheme)
    if as_json:
        _print_json({"key": key, "hash": hashed, "tenant": tenant, "name": name})
        return
    out.print(f"key (shown once; give it to the client): {key}", highlight=False, markup=False, soft_wrap=True)
    out.print("add to your profile:", highlight=False, markup=False)
    lines = ["[[api.keys]]", f'hash = "{hashed}"', f'tenant = "{tenant}"'] + ([f'name = "{name}"'] if name else [])
    out.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


def main() -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")  # unstructured's telemetry look-up
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = app(standalone_mode=False)  # returns the code of a typer.Exit in non-standalone mode
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except MmragError as exc:
        if _State.verbose:
            err.print_exception()
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(exit_code(exc))
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a bare traceback
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _State.verbose:
            err.print_exception()
        err.print(f"internal error: {type(exc).__name__}: {exc} (run with --verbose for details)",
                  highlight=False, markup=False)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
