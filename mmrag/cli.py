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
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


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
    """The shape ``mmrag search --json`` prints (and the HTTP API returns)."""
    def common(hit: Any) -> dict[str, Any]:
        return {"id": hit.chunk.id, "doc_id": hit.chunk.doc_id, "source": hit.source, "page": hit.chunk.page,
                "score": hit.score, "scores": hit.scores}

    return {
        "text": [common(h) | {"text": h.chunk.text} for h in grounding.text_hits],
        "images": [common(h) | {"context": h.chunk.context, "blob": blobs.url_of(h.chunk.blob)}
                   for h in grounding.image_hits],
        "grounded": grounding.grounded,
    }


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
        snippet = " ".join(hit["text"].split())[:160]
        table.add_row(str(i), Path(hit["source"]).name, str(hit["page"] or "-"), f"{hit['score']:.3f}", scores(hit),
                      snippet)
    out.print(table)
    if result["images"]:
        table = Table(title="reference images")
        for column in ("#", "source", "page", "score", "signals", "context", "blob"):
            table.add_column(column, overflow="fold")
        for i, hit in enumerate(result["images"], 1):
            table.add_row(str(i), Path(hit["source"]).name, str(hit["page"] or "-"), f"{hit['score']:.3f}",
                          scores(hit), hit["context"][:120], hit["blob"])
        out.print(table)
    if not result["grounded"]:
        out.print("nothing passed the relevance threshold: a generation would abstain")


@app.command("eval")
def eval_(
    dataset: str = typer.Argument(..., help='"halueval", "tuxpaint", or a path to a .jsonl eval set.'),
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
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: ./mmrag-eval/NAME-TIME)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report's summary as JSON."),
) -> None:
    """Evaluate retrieval and grounded generation on an eval set, in a knowledge base of its own; writes
    report.json (metric definitions included)."""
    from eval.cli import eval_command, merge_overrides, summary_table
    from mmrag.runtime import Runtime

    def runtime_factory(**overrides: Any) -> Any:
        return Runtime(load_settings(**merge_overrides(_State.settings_kwargs, overrides)))

    outcome = eval_command(runtime_factory, dataset, corpus, limit, out_dir, retrieval_only, as_json,
                           baseline=baseline, unanswerable=unanswerable, max_new_tokens=max_new_tokens)
    for note in outcome.notes:
        err.print(f"note: {note}", highlight=False, markup=False)
    if as_json:
        _print_json(outcome.summary)
    else:
        out.print(summary_table(outcome))
        out.print(f"report: {outcome.path}", highlight=False, markup=False)


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
            for piece in stream:
                out.file.write(piece)
                out.file.flush()
            answer = stream.result
            out.print()
            _print_sources(answer)
            for hit in grounding.image_hits:
                out.print(f"Reference image: {hit.chunk.context}\n  {runtime.blobs.url_of(hit.chunk.blob)}",
                          highlight=False, markup=False)
    if report.failed:
        for failure in report.failed:
            err.print(f"failed {failure.source}: {failure.reason}", highlight=False, markup=False)
        raise typer.Exit(1)

@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The question or instruction to answer from the knowledge base."),
    no_image: bool = typer.Option(False, "--no-image", help="Text only: generate no images."),
    k_text: Optional[int] = typer.Option(None, "--k-text", help="Passages to ground on [default: the profile's]."),
    k_image: Optional[int] = typer.Option(None, "--k-image", help="Reference images to ground on."),
    filter_: Optional[str] = typer.Option(None, "--filter", help="Restrict the sources (see `mmrag search`)."),
    tenant: Optional[str] = typer.Option(None, "--tenant"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="At most this many new tokens."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 (default): greedy."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (same seed, same answer)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop at this string (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer, citations and sources as JSON."),
) -> None:
    """Answer from the knowledge base with [n] citations; abstain when nothing relevant is found."""
    from generation.grounded import GroundedGenerator
    from retrieval.retriever import Query

    with _runtime() as runtime:
        generator = GroundedGenerator(runtime)
        params = generator.params(max_new_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop)
        query = Query(text=prompt, k_text=k_text, k_image=k_image,
                      filter=filter_, tenant=tenant)
        stream = generator.stream(prompt, query=query, params=params)
        if as_json:
            result = stream.result
            _print_json(result.to_json())
            return
        for piece in stream:  # tokens as they come
            out.file.write(piece)
            out.file.flush()
        result = stream.result
    out.print()
    _print_sources(result)


def _print_sources(result: Any) -> None:
    if result.abstained:
        reason = ("nothing in the knowledge base passed the relevance threshold" if result.abstain_reason ==
                  "no-grounding" else "the model found no answer in the sources")
        out.print(f"(abstained: {reason})", highlight=False)
        return
    if result.citations:
        out.print("\nSources:")
        for c in result.citations:
            page = f", page {c.page}" if c.page is not None else ""
            out.print(f"  [{c.marker}] {Path(c.source).name}{page}: {c.snippet[:140]}", highlight=False, markup=False)
    if result.removed_citations:
        out.print(f"removed citations of sources that were not given: {list(result.removed_citations)}",
                  highlight=False)
    if result.unsupported:
        out.print("Not supported by a cited source:")
        for sentence in result.unsupported:
            out.print(f"  - {sentence}", highlight=False, markup=False)


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
