"""``mmrag eval DATASET --retrieval-only``: ingest an eval set's corpus into a dedicated knowledge base, evaluate
retrieval in every mode, print a table and write ``report.json``.

``mmrag.cli`` registers the command and prints; the work happens in ``eval_command``:
  1. check the options (``--retrieval-only`` is required: generation evaluation does not exist yet);
  2. load the eval set: ``halueval`` (``--corpus`` = the HaluEval QA ``.jsonl``), ``tuxpaint`` (``--corpus`` = the
     folder holding ``captions.jsonl`` and ``images/``) or a path to a ``.jsonl`` eval set in the schema of
     ``eval.datasets`` (``--corpus`` = the folder, or file, to ingest; gold paths are relative to it);
  3. open a knowledge base of its own, so an evaluation never touches the user's: collection ``eval_<name>``, and
     under the embedded store a data dir ``<data dir>/eval/<name>`` (Milvus file, blobs, and the written corpus).
     Image blobs go to a store of their own too (``<blob url>-eval-<name>`` when a blob URL is configured): an
     ingest sweeps every blob its own knowledge base does not reference, so a shared store would lose the user's;
  4. ingest the corpus (unchanged files are skipped on a second run) and remove documents of earlier runs that are
     not in this corpus, so the knowledge base holds exactly the corpus;
  5. run ``eval.retrieval.run_retrieval_eval`` and write the report.
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

from eval.datasets import Corpus, EvalRecord, halueval, load_jsonl, resolve_gold, tuxpaint
from eval.retrieval import DEFAULT_MODES, run_retrieval_eval
from mmrag.errors import BadInputError, ConfigError, EncoderMismatchError

logger = logging.getLogger(__name__)

__all__ = ["EvalOutcome", "eval_command", "merge_overrides", "summary_table"]

NAMED_DATASETS: dict[str, str] = {
    "halueval": "the HaluEval QA file (qa_dev.jsonl: knowledge, question, right_answer per line)",
    "tuxpaint": "the Tux Paint stamps folder (captions.jsonl and images/)",
}
TABLE_METRICS: tuple[str, ...] = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@5", "ndcg@10")
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


def _load(dataset: str, corpus: Path | None, limit: int | None) -> tuple[list[EvalRecord], Callable[[Path], Corpus]]:
    """Records (gold paths relative to the corpus root) and the corpus builder for DATASET."""
    if dataset in NAMED_DATASETS:
        if corpus is None:
            raise BadInputError(f"{dataset} needs --corpus PATH: {NAMED_DATASETS[dataset]}")
        corpus = corpus.expanduser()
        if dataset == "halueval":
            if corpus.is_dir() and (corpus / "qa_dev.jsonl").is_file():
                corpus = corpus / "qa_dev.jsonl"
            if not corpus.is_file():
                raise BadInputError(f"--corpus {str(corpus)!r} is not a file: halueval needs "
                                    f"{NAMED_DATASETS['halueval']}")
            return halueval(corpus, limit)
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
    return {key: value for key, value in report.items() if key != "examples"} | {"report": str(path)}


def eval_command(runtime_factory: RuntimeFactory, dataset: str, corpus: Path | None, limit: int | None,
                 out: Path | None, retrieval_only: bool, as_json: bool) -> EvalOutcome:
    """Run ``mmrag eval``; ``runtime_factory(**overrides)`` builds a ``Runtime`` from the entry point's settings
    with ``load_settings``-style overrides merged in (nested sections key by key)."""
    # 1. Check the options.
    if not retrieval_only:
        raise ConfigError("generation evaluation is not available yet; run `mmrag eval DATASET --retrieval-only` "
                          "to evaluate retrieval")
    if limit is not None and limit < 1:
        raise BadInputError(f"--limit must be at least 1, got {limit}")
    progress = sys.stderr.isatty() and not as_json
    notes: list[str] = []

    # 2. The eval set, its corpus, and gold that names files of that corpus.
    name = _dataset_name(dataset)
    records, build = _load(dataset, corpus, limit)
    ungrounded = [r.id for r in records if not (r.gold_sources or r.gold_images)]
    if ungrounded:
        raise BadInputError(f"{len(ungrounded)} record(s) have no gold_sources or gold_images (first: "
                            f"{ungrounded[0]!r}); retrieval evaluation needs to know which files answer each prompt")
    base = runtime_factory().settings
    started = datetime.now(timezone.utc)
    built = build(base.data_dir / "eval" / name / "corpus")
    records = resolve_gold(records, built.root)
    missing = sorted({p for r in records for p in (*r.gold_sources, *r.gold_images) if not Path(p).is_file()})
    if missing:
        raise BadInputError(f"{len(missing)} gold file(s) do not exist, e.g. {missing[0]!r}: gold paths are "
                            f"relative to the corpus ({str(built.root)!r})")

    # 3. A knowledge base of its own.
    runtime = runtime_factory(**_eval_settings(base, name))
    with runtime:
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
    for mode, reason in result["skipped"].items():
        notes.append(f"{mode} skipped: {reason}")

    report = {
        "dataset": {"name": name, "given": dataset, "source": str(corpus.expanduser().resolve()) if corpus else None,
                    "records": len(records), "limit": limit},
        "created": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 2),
        "corpus": {"root": str(built.root), **ingested},
        **result,
    }
    report["config"] = {"retrieval_only": True, "profile": base.profile, **result["config"]}
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
    """A rich table: one row per mode, one column per metric, latency last; skipped modes say why."""
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
