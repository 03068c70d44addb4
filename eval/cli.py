"""``mmrag eval DATASET``: ingest an eval set's corpus into a dedicated knowledge base, evaluate retrieval in every
mode and, unless ``--retrieval-only``, grounded generation; print tables and write ``report.json``.

``mmrag.cli`` registers the command and prints; the work happens in ``eval_command``:
  1. check the options (``--baseline`` and ``--unanswerable`` belong to generation evaluation; ``--unanswerable``
     to HaluEval, whose later questions have passages of their own);
  2. load the eval set: ``halueval`` (``--corpus`` = the HaluEval QA ``.jsonl``), ``tuxpaint`` (``--corpus`` = the
     folder holding ``captions.jsonl`` and ``images/``) or a path to a ``.jsonl`` eval set in the schema of
     ``eval.datasets`` (``--corpus`` = the folder, or file, to ingest; gold paths are relative to it). Generation
     evaluation needs a gold answer per record (tuxpaint has none). With ``--unanswerable M`` the first ``--limit``
     HaluEval questions (default: all but M) are answerable and the next M whose passages are not among theirs are
     asked too, without their passages in the corpus (``eval.datasets.halueval_held_out``);
  3. open a knowledge base of its own, so an evaluation never touches the user's: collection ``eval_<name>``, and
     under the embedded store a data dir ``<data dir>/eval/<name>`` (Milvus file, blobs, and the written corpus).
     Image blobs go to a store of their own too (``<blob url>-eval-<name>`` when a blob URL is configured): an
     ingest sweeps every blob its own knowledge base does not reference, so a shared store would lose the user's;
  4. ingest the corpus (unchanged files are skipped on a second run) and remove documents of earlier runs that are
     not in this corpus, so the knowledge base holds exactly the corpus;
  5. run ``eval.retrieval.run_retrieval_eval`` over the answerable records, then (generation) load the LLM and run
     ``eval.generation.run_generation_eval`` with ``generation.max_new_tokens`` set to ``--max-new-tokens``; write
     the report (generation under ``"generation"``, its definitions included).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eval.datasets import Corpus, EvalRecord, halueval, halueval_held_out, load_jsonl, resolve_gold, tuxpaint
from eval.retrieval import DEFAULT_MODES, run_retrieval_eval
from mmrag.errors import BadInputError, EncoderMismatchError

logger = logging.getLogger(__name__)

__all__ = ["EvalOutcome", "eval_command", "merge_overrides", "summary_table"]

NAMED_DATASETS: dict[str, str] = {
    "halueval": "the HaluEval QA file (qa_dev.jsonl: knowledge, question, right_answer per line)",
    "tuxpaint": "the Tux Paint stamps folder (captions.jsonl and images/)",
}
TABLE_METRICS: tuple[str, ...] = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@5", "ndcg@10")
DEFAULT_MAX_NEW_TOKENS = 64  # decoding runs about 15 tokens/s on a 2-core CPU; HaluEval answers are a few words
RuntimeFactory = Callable[..., Any]


@dataclass
class EvalOutcome:
    """What ``eval_command`` produced: the full report, where it was written, its summary and notes for the user."""

    report: dict[str, Any]
    path: Path
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Settings keyword arguments with ``overrides`` merged in, nested sections key by key (overrides win)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dataset_name(dataset: str) -> str:
    if dataset in NAMED_DATASETS:
        return dataset
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(dataset).stem).strip("_").lower()
    return (stem or "set")[:40]


def _halueval_path(corpus: Path) -> Path:
    corpus = corpus.expanduser()
    if corpus.is_dir() and (corpus / "qa_dev.jsonl").is_file():
        corpus = corpus / "qa_dev.jsonl"
    if not corpus.is_file():
        raise BadInputError(f"--corpus {str(corpus)!r} is not a file: halueval needs {NAMED_DATASETS['halueval']}")
    return corpus


def _load(dataset: str, corpus: Path | None, limit: int | None, unanswerable: int = 0,
          ) -> tuple[list[EvalRecord], Callable[[Path], Corpus], list[EvalRecord]]:
    """Records (gold paths relative to the corpus root), the corpus builder for DATASET, and with ``unanswerable``
    (HaluEval only) that many later records whose passages the corpus leaves out."""
    if dataset == "halueval" and corpus is not None and unanswerable:
        path = _halueval_path(corpus)
        if limit is None:
            total = sum(1 for line in path.open(encoding="utf-8") if line.strip() and not line.startswith("#"))
            limit = max(total - unanswerable, 1)
        records, build = halueval(path, limit)
        return records, build, halueval_held_out(path, len(records), unanswerable)
    records, build = _load_answerable(dataset, corpus, limit)
    return records, build, []


def _load_answerable(dataset: str, corpus: Path | None, limit: int | None,
                     ) -> tuple[list[EvalRecord], Callable[[Path], Corpus]]:
    if dataset in NAMED_DATASETS:
        if corpus is None:
            raise BadInputError(f"{dataset} needs --corpus PATH: {NAMED_DATASETS[dataset]}")
        corpus = corpus.expanduser()
        if dataset == "halueval":
            return halueval(_halueval_path(corpus), limit)
        if not corpus.is_dir():
            raise BadInputError(f"--corpus {str(corpus)!r} is not a folder: tuxpaint needs {NAMED_DATASETS['tuxpaint']}")
        return tuxpaint(corpus, limit)
    path = Path(dataset).expanduser()
    if path.suffix.lower() != ".jsonl":
        raise BadInputError(f"unknown dataset {dataset!r}: use halueval, tuxpaint, or a path to a .jsonl eval set")
    if not path.is_file():
        raise BadInputError(f"eval set {dataset!r} does not exist")
    if corpus is None:
        raise BadInputError(f"{dataset} needs --corpus PATH: the folder (or file) holding the documents its "
                            "gold_sources and gold_images name")
    corpus = corpus.expanduser()
    if not corpus.exists():
        raise BadInputError(f"--corpus {str(corpus)!r} does not exist")
    records = load_jsonl(path, limit)
    root = corpus.resolve() if corpus.is_dir() else corpus.resolve().parent
    target = corpus.resolve()

    def build(folder: Path) -> Corpus:  # noqa: ARG001 - the user's files are used where they are
        return Corpus(root=root, files=(target,))

    return records, build


def _eval_settings(base: Any, name: str) -> dict[str, Any]:
    """Overrides that give the evaluation its own knowledge base, data dir and blob store."""
    overrides: dict[str, Any] = {"milvus": {"collection": f"eval_{name}"}}
    if base.milvus.uri is None:
        overrides["data_dir"] = base.data_dir / "eval" / name
    if base.blobs.url:
        overrides["blobs"] = {"url": f"{base.blobs.url.rstrip('/')}-eval-{name}"}
    elif base.milvus.uri is not None:
        overrides["blobs"] = {"url": str(base.data_dir / "eval" / name / "blobs")}
    return overrides


def _ingest(runtime: Any, corpus: Corpus, progress: bool) -> dict[str, Any]:
    """Ingest the corpus and drop documents of earlier runs that are not part of it."""
    from ingest.sources import discover

    ingest_settings = runtime.settings.ingest
    files = discover(list(corpus.files), ingest_settings.include, ingest_settings.exclude).files
    if not files:
        raise BadInputError(f"the corpus under {str(corpus.root)!r} holds no supported files")
    start = time.perf_counter()
    report = runtime.ingestor.ingest(list(files), progress=progress)
    tenant = runtime.settings.tenant
    wanted = {str(f) for f in files}
    stale = [d.doc_id for d in runtime.index.documents(tenant) if d.source not in wanted]
    removed = runtime.ingestor.delete(stale, tenant) if stale else 0
    return {"files": len(files), "added": report.added, "updated": report.updated, "unchanged": report.unchanged,
            "removed_stale": removed, "failed": [{"source": f.source, "reason": f.reason} for f in report.failed],
            "chunks": runtime.index.stats(tenant)["chunks"], "seconds": round(time.perf_counter() - start, 2)}


def _summary(report: dict[str, Any], path: Path) -> dict[str, Any]:
    summary = {key: value for key, value in report.items() if key != "examples"}
    if "generation" in summary:
        summary["generation"] = {k: v for k, v in summary["generation"].items() if k not in ("examples",
                                                                                            "definitions")}
    return summary | {"report": str(path)}


def eval_command(runtime_factory: RuntimeFactory, dataset: str, corpus: Path | None, limit: int | None,
                 out: Path | None, retrieval_only: bool, as_json: bool, *, baseline: bool = False,
                 unanswerable: int = 0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> EvalOutcome:
    """Run ``mmrag eval``; ``runtime_factory(**overrides)`` builds a ``Runtime`` from the entry point's settings
    with ``load_settings``-style overrides merged in (nested sections key by key)."""
    # 1. Check the options.
    if limit is not None and limit < 1:
        raise BadInputError(f"--limit must be at least 1, got {limit}")
    if unanswerable < 0:
        raise BadInputError(f"--unanswerable must be at least 0, got {unanswerable}")
    if max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if retrieval_only and (baseline or unanswerable):
        raise BadInputError("--baseline and --unanswerable evaluate generation: drop --retrieval-only")
    if unanswerable and dataset != "halueval":
        raise BadInputError("--unanswerable works with halueval (its later questions bring passages of their own); "
                            f"not with {dataset!r}")
    progress = sys.stderr.isatty() and not as_json
    notes: list[str] = []

    # 2. The eval set, its corpus, and gold that names files of that corpus.
    name = _dataset_name(dataset)
    records, build, held_out = _load(dataset, corpus, limit, unanswerable)
    ungrounded = [r.id for r in records if not (r.gold_sources or r.gold_images)]
    if ungrounded:
        raise BadInputError(f"{len(ungrounded)} record(s) have no gold_sources or gold_images (first: "
                            f"{ungrounded[0]!r}); retrieval evaluation needs to know which files answer each prompt")
    if not retrieval_only:
        unanswered = [r.id for r in records if not r.gold_answer]
        if unanswered:
            raise BadInputError(f"{len(unanswered)} record(s) have no gold_answer (first: {unanswered[0]!r}); "
                                "generation evaluation scores answers against it: add gold answers, or evaluate "
                                "retrieval alone with --retrieval-only")
    if len(held_out) < unanswerable:
        notes.append(f"only {len(held_out)} of the {unanswerable} unanswerable questions asked for exist after the "
                     f"first {len(records)} (later questions whose passage is not in the corpus)")
    base = runtime_factory().settings
    started = datetime.now(timezone.utc)
    built = build(base.data_dir / "eval" / name / "corpus")
    records = resolve_gold(records, built.root)
    missing = sorted({p for r in records for p in (*r.gold_sources, *r.gold_images) if not Path(p).is_file()})
    if missing:
        raise BadInputError(f"{len(missing)} gold file(s) do not exist, e.g. {missing[0]!r}: gold paths are "
                            f"relative to the corpus ({str(built.root)!r})")

    # 3. A knowledge base of its own (and, for generation, the answer length set here, not the profile's).
    overrides = _eval_settings(base, name)
    if not retrieval_only:
        overrides["generation"] = {"max_new_tokens": max_new_tokens}
    runtime = runtime_factory(**overrides)
    generation: dict[str, Any] | None = None
    with runtime:
        if not retrieval_only:
            runtime.models.llm  # noqa: B018 - load it (or fail naming what to install) before the ingest
        if runtime.models.clip is None and any(r.gold_images for r in records):
            notes.append("no CLIP weights found: images are searched through their context text only (for "
                         "stand-alone images, their file name); `mmrag models` says what to configure")

        # 4. Ingest the corpus.
        try:
            ingested = _ingest(runtime, built, progress)
        except EncoderMismatchError:
            # This knowledge base belongs to the evaluation alone: rebuild it with the encoders configured now.
            notes.append(f"knowledge base {runtime.settings.milvus.collection!r} was built with other encoders; "
                         "rebuilt it")
            runtime.index.delete_all()
            runtime.blobs.sweep(set())
            ingested = _ingest(runtime, built, progress)
        if ingested["failed"]:
            notes.append(f"{len(ingested['failed'])} corpus file(s) failed to ingest (listed in the report); "
                         "prompts whose gold is among them cannot be found")

        # 5. Evaluate.
        result = run_retrieval_eval(runtime, records, modes=DEFAULT_MODES, progress=progress)
        if not retrieval_only:
            from eval.generation import run_generation_eval

            generation = run_generation_eval(runtime, records, unanswerable=held_out, baseline=baseline,
                                             progress=progress)
    for mode, reason in result["skipped"].items():
        notes.append(f"{mode} skipped: {reason}")

    report = {
        "dataset": {"name": name, "given": dataset, "source": str(corpus.expanduser().resolve()) if corpus else None,
                    "records": len(records), "limit": limit, "unanswerable": len(held_out)},
        "created": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 2),
        "corpus": {"root": str(built.root), **ingested},
        **result,
    }
    report["config"] = {"retrieval_only": retrieval_only, "profile": base.profile, **result["config"]}
    if generation is not None:
        report["generation"] = generation
    folder = out or Path("mmrag-eval") / f"{name}-{started.strftime('%Y%m%d-%H%M%S')}"
    path = folder.expanduser().resolve() / "report.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"cannot write the report into {str(path.parent)!r}: {exc.strerror or exc}") from exc
    logger.info("wrote %s", path)
    return EvalOutcome(report=report, path=path, summary=_summary(report, path), notes=notes)


def summary_table(outcome: EvalOutcome) -> Any:
    """Rich tables: retrieval (one row per mode, one column per metric, latency last; skipped modes say why) and,
    after a generation evaluation, generation (grounded answers, the baseline, the unanswerable questions)."""
    from rich.console import Group

    retrieval = _retrieval_table(outcome)
    if "generation" not in outcome.report:
        return retrieval
    return Group(retrieval, _generation_table(outcome))


def _generation_table(outcome: EvalOutcome) -> Any:
    from rich.table import Table

    data = outcome.report["generation"]
    config = data["config"]

    def cell(value: Any, fmt: str = "{:.3f}") -> str:
        return "-" if value is None else fmt.format(value)

    table = Table(title=f"generation on {outcome.report['dataset']['name']} ({config['model']}, "
                        f"{config['sampling']['max_new_tokens']} new tokens at most)")
    table.add_column("answers")
    for column in ("n", "accuracy", "token F1", "cit. precision", "cit. recall", "unsupported", "abstained",
                   "p50 s"):
        table.add_column(column, justify="right")
    rag = data["rag"]
    table.add_row("grounded", str(rag["n"]), cell(rag["accuracy"]), cell(rag["token_f1"]),
                  cell(rag["citation_precision"]), cell(rag["citation_recall"]),
                  cell(rag["unsupported_sentence_rate"]), cell(rag["abstention_rate"]),
                  cell(rag["latency_s"]["p50"], "{:.2f}"))
    if "baseline" in data:
        base = data["baseline"]
        table.add_row("baseline (no retrieval)", str(base["n"]), cell(base["accuracy"]), cell(base["token_f1"]),
                      "-", "-", "-", "-", cell(base["latency_s"]["p50"], "{:.2f}"))
    if "unanswerable" in data:
        held = data["unanswerable"]
        reasons = held["by_reason"]
        table.add_row("unanswerable (passage not ingested)", str(held["n"]), "-", "-", "-", "-", "-",
                      f"{cell(held['abstention_rate'])} ({cell(reasons['no-grounding'])} threshold, "
                      f"{cell(reasons['model'])} model)", cell(held["latency_s"]["p50"], "{:.2f}"))
    table.caption = ("accuracy: gold answer contained in the answer; citation precision: cited chunks from the gold "
                     "passage; citation recall: answers citing the gold passage; unsupported: sentences without "
                     "support; definitions in report.json")
    return table


def _retrieval_table(outcome: EvalOutcome) -> Any:
    from rich.table import Table

    report = outcome.report
    k = report["config"].get("k", 5)
    columns = [m.replace("@5", f"@{k}") for m in TABLE_METRICS]
    table = Table(title=f"retrieval on {report['dataset']['name']} ({report['config']['records']} prompts, "
                        f"{report['corpus']['files']} corpus files)")
    table.add_column("mode")
    for column in ("n", *columns, "p50 ms", "p95 ms"):
        table.add_column(column.replace("mrr", "MRR").replace("ndcg", "nDCG"), justify="right")
    for mode, data in report["modes"].items():
        table.add_row(mode, str(data["n"]), *(f"{data[c]:.3f}" for c in columns),
                      f"{data['latency_ms']['p50']:.1f}", f"{data['latency_ms']['p95']:.1f}")
    for mode in report["skipped"]:
        table.add_row(mode, "-", *(["skipped"] + [""] * (len(columns) + 1)))
    if report["skipped"]:
        table.caption = "; ".join(f"{mode} skipped: {reason}" for mode, reason in report["skipped"].items())
    return table
