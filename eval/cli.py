"""``mmrag eval DATASET``: ingest an eval set's corpus into a dedicated knowledge base, evaluate retrieval in every
mode and, unless ``--retrieval-only``, grounded generation (and with ``--images`` generated pictures); print tables
and write ``report.json`` and ``report.html`` into the run folder. ``mmrag eval compare A B`` and
``mmrag eval halueval --detector`` are here too.

``mmrag.cli`` registers the command and prints; the work happens in ``eval_command``:
  1. check the options (``--baseline`` and ``--unanswerable`` belong to generation evaluation; ``--unanswerable``
     to HaluEval, whose later questions have passages of their own; ``--detector`` to HaluEval alone) and the
     ``--fail-under``/``--fail-over`` gates (``eval.gate``: unknown metric names are refused before any work);
  2. load the eval set: ``halueval`` (``--corpus`` = the HaluEval QA ``.jsonl``), ``tuxpaint`` (``--corpus`` = the
     folder holding ``captions.jsonl`` and ``images/``) or a path to a ``.jsonl`` eval set in the schema of
     ``eval.datasets`` (``--corpus`` = the folder, or file, to ingest; gold paths are relative to it; a bad line is
     reported and skipped). Generation evaluation needs a gold answer per record (tuxpaint has none; with
     ``--images`` text generation is then skipped). With ``--unanswerable M`` the first ``--limit`` HaluEval
     questions (default: all but M) are answerable and the next M whose passages are not among theirs are asked
     too, without their passages in the corpus (``eval.datasets.halueval_held_out``);
  3. open the run folder (``eval.runstate``): a new run, or the rest of an interrupted one with the same
     configuration, whose finished examples are skipped; another configuration is refused unless ``--fresh``;
  4. open a knowledge base of its own, so an evaluation never touches the user's: collection ``eval_<name>``, and
     under the embedded store a data dir ``<data dir>/eval/<name>`` (Milvus file, blobs, and the written corpus).
     Image blobs go to a store of their own too (``<blob url>-eval-<name>`` when a blob URL is configured): an
     ingest sweeps every blob its own knowledge base does not reference, so a shared store would lose the user's;
  5. ingest the corpus (unchanged files are skipped on a second run) and remove documents of earlier runs that are
     not in this corpus, so the knowledge base holds exactly the corpus;
  6. run ``eval.retrieval.run_retrieval_eval`` over the answerable records, then (generation) load the LLM and run
     ``eval.generation.run_generation_eval`` with ``generation.max_new_tokens`` set to ``--max-new-tokens``, then
     (``--images``) ``eval.images.run_image_eval``; each finished example is appended to the run's JSONL;
  7. check the gates and write the report (generation under ``"generation"``, images under ``"images"``, their
     definitions included) as JSON and as HTML (``eval.html``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
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
    gates: list[dict[str, Any]] = field(default_factory=list)  # eval.gate.check_gates entries

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.gates if not g["passed"]]


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
          problems: list[str] | None = None,
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
    records, build = _load_answerable(dataset, corpus, limit, problems)
    return records, build, []


def _load_answerable(dataset: str, corpus: Path | None, limit: int | None, problems: list[str] | None = None,
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
    records = load_jsonl(path, limit, problems=problems)
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
    for block in ("generation", "detector", "images"):
        if block in summary:
            summary[block] = {k: v for k, v in summary[block].items() if k not in ("examples", "definitions")}
    return summary | {"report": str(path)}


def _file_digest(path: Path | None) -> str | None:
    """sha256 of a file (the eval set, HaluEval's file) so an edited set does not resume an old run."""
    import hashlib

    if path is None or not path.is_file() or path.stat().st_size > 256 * 1024 * 1024:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_config(base: Any, dataset: str, corpus: Path | None, limit: int | None, retrieval_only: bool,
                baseline: bool, unanswerable: int, max_new_tokens: int, images: bool = False) -> dict[str, Any]:
    """Everything that changes an example's result: a resumed run must have the same."""
    given = Path(dataset).expanduser() if dataset not in NAMED_DATASETS else None
    source = corpus.expanduser().resolve() if corpus is not None else None
    return {
        "dataset": dataset, "dataset_sha256": _file_digest(given.resolve() if given else None),
        "corpus": str(source) if source else None,
        "corpus_sha256": _file_digest(source) if dataset == "halueval" and source else None,
        "limit": limit, "unanswerable": unanswerable, "retrieval_only": retrieval_only, "baseline": baseline,
        "max_new_tokens": None if retrieval_only else max_new_tokens,
        "images": images,
        "settings": {section: getattr(base, section).model_dump(mode="json")
                     for section in ("models", "retrieval", "generation", "ingest", *(("image",) if images else ()))},
        "milvus_uri": base.milvus.uri,
    }


def _thresholds(fail_under: Sequence[str], fail_over: Sequence[str], **options: Any) -> list[Any]:
    from eval.gate import metric_names, parse_thresholds

    if not (fail_under or fail_over):
        return []
    valid = metric_names(**options)
    return parse_thresholds(fail_under, "under", valid) + parse_thresholds(fail_over, "over", valid)


def _write(folder: Path, report: dict[str, Any]) -> Path:
    from eval.html import write_html

    path = folder.expanduser().resolve() / "report.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_html(report, path.with_name("report.html"))
    except OSError as exc:
        raise BadInputError(f"cannot write the report into {str(path.parent)!r}: {exc.strerror or exc}") from exc
    logger.info("wrote %s and report.html", path)
    return path


def eval_command(runtime_factory: RuntimeFactory, dataset: str, corpus: Path | None, limit: int | None,
                 out: Path | None, retrieval_only: bool, as_json: bool, *, baseline: bool = False,
                 unanswerable: int = 0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, detector: bool = False,
                 fail_under: Sequence[str] = (), fail_over: Sequence[str] = (), fresh: bool = False,
                 progress: bool | None = None, images: bool = False) -> EvalOutcome:
    """Run ``mmrag eval``; ``runtime_factory(**overrides)`` builds a ``Runtime`` from the entry point's settings
    with ``load_settings``-style overrides merged in (nested sections key by key).

    ``out`` is the run folder: per-example records go to ``examples.jsonl`` as they finish, and a rerun with the same
    folder and configuration skips them (``eval.runstate``); ``fresh`` discards a folder's earlier run.
    ``fail_under``/``fail_over`` are ``METRIC=VALUE`` gates (``eval.gate``), checked against the finished report;
    the outcome's ``gates`` say which failed (the CLI then exits ``EXIT_GATE_FAILED``). ``images`` adds the image
    stage (``eval.images``) for records with gold images; text generation then runs only when every record has a
    gold answer."""
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
    if detector:
        if dataset != "halueval":
            raise BadInputError(f"--detector measures the support scorer on HaluEval's labelled answer pairs: use "
                                f"`mmrag eval halueval --detector --corpus qa_dev.jsonl`, not {dataset!r}")
        if retrieval_only or baseline or unanswerable:
            raise BadInputError("--detector scores the support scorer alone: drop --retrieval-only, --baseline and "
                                "--unanswerable")
    if images and (retrieval_only or detector):
        raise BadInputError("--images evaluates generated pictures: drop --retrieval-only and --detector")
    thresholds = _thresholds(fail_under, fail_over, retrieval=not detector, generation=not (retrieval_only or detector),
                             baseline=baseline, unanswerable=bool(unanswerable), detector=detector, images=images)
    if progress is None:
        progress = sys.stderr.isatty() and not as_json
    if detector:
        return _detector_command(runtime_factory, corpus, limit, out, thresholds, progress)
    notes: list[str] = []

    # 2. The eval set, its corpus, and gold that names files of that corpus.
    name = _dataset_name(dataset)
    problems: list[str] = []
    records, build, held_out = _load(dataset, corpus, limit, unanswerable, problems)
    for problem in problems[:20]:
        notes.append(f"skipped a bad line: {problem}")
    if len(problems) > 20:
        notes.append(f"... and {len(problems) - 20} more bad lines (all listed in the report)")
    ungrounded = [r.id for r in records if not (r.gold_sources or r.gold_images)]
    if ungrounded:
        raise BadInputError(f"{len(ungrounded)} record(s) have no gold_sources or gold_images (first: "
                            f"{ungrounded[0]!r}); retrieval evaluation needs to know which files answer each prompt")
    text = not retrieval_only
    if text:
        unanswered = [r.id for r in records if not r.gold_answer]
        if unanswered and images:
            text = False
            notes.append(f"{len(unanswered)} record(s) have no gold_answer: text generation is not evaluated, "
                         "images are")
        elif unanswered:
            raise BadInputError(f"{len(unanswered)} record(s) have no gold_answer (first: {unanswered[0]!r}); "
                                "generation evaluation scores answers against it: add gold answers, or evaluate "
                                "retrieval alone with --retrieval-only")
    if images and not any(r.gold_images for r in records):
        raise BadInputError("--images scores pictures against gold images, and no record has gold_images")
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

    # 3. The run folder: a new run, or the rest of an interrupted one with the same configuration.
    from eval.runstate import RunState

    folder = out or Path("mmrag-eval") / f"{name}-{started.strftime('%Y%m%d-%H%M%S')}"
    state = RunState.open(folder, _run_config(base, dataset, corpus, limit, retrieval_only, baseline, unanswerable,
                                              max_new_tokens, images), fresh=fresh)
    if state.resumed:
        counts = ", ".join(f"{n} {stage}" for stage, n in state.resumed_count.items()) or "no examples"
        notes.append(f"resuming the run in {state.folder} ({counts} already done)")

    # 4. A knowledge base of its own (and, for generation, the answer length set here, not the profile's).
    overrides = _eval_settings(base, name)
    if text:
        overrides["generation"] = {"max_new_tokens": max_new_tokens}
    runtime = runtime_factory(**overrides)
    generation: dict[str, Any] | None = None
    pictures: dict[str, Any] | None = None
    with runtime:
        if text:
            runtime.models.llm  # noqa: B018 - load it (or fail naming what to install) before the ingest
            runtime.models.support_scorer  # noqa: B018 - likewise
        if images:
            runtime.models.image_generator  # noqa: B018 - likewise
            if runtime.models.clip is None:
                notes.append("no CLIP weights found: pictures are generated and listed, but CLIPScore and CLIP-I "
                             "need CLIP (models.clip)")
        if runtime.models.clip is None and any(r.gold_images for r in records):
            notes.append("no CLIP weights found: images are searched through their context text only (for "
                         "stand-alone images, their file name); `mmrag models` says what to configure")

        # 5. Ingest the corpus.
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

        # 6. Evaluate, recording every finished example in the run folder.
        result = run_retrieval_eval(runtime, records, modes=DEFAULT_MODES, progress=progress,
                                    done=state.finished("retrieval"), on_example=state.recorder("retrieval"))
        if text:
            from eval.generation import run_generation_eval

            generation = run_generation_eval(runtime, records, unanswerable=held_out, baseline=baseline,
                                             progress=progress, done=state.finished("generation"),
                                             on_example=state.recorder("generation"))
        if images:
            from eval.images import run_image_eval

            pictures = run_image_eval(runtime, [r for r in records if r.gold_images], state.folder / "images",
                                      progress=progress, done=state.finished("images"),
                                      on_example=state.recorder("images"))
            failed = pictures["summary"]["failed"]
            if failed:
                notes.append(f"{failed} picture(s) could not be made (errors in the report)")
    for mode, reason in result["skipped"].items():
        notes.append(f"{mode} skipped: {reason}")

    # 7. The report, its gates, report.json and report.html.
    report = {
        "dataset": {"name": name, "given": dataset, "source": str(corpus.expanduser().resolve()) if corpus else None,
                    "records": len(records), "limit": limit, "unanswerable": len(held_out),
                    "skipped_lines": problems},
        "created": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 2),
        "corpus": {"root": str(built.root), **ingested},
        **result,
    }
    report["config"] = {"retrieval_only": retrieval_only, "profile": base.profile, **result["config"]}
    if generation is not None:
        report["generation"] = generation
    if pictures is not None:
        report["images"] = pictures
    report["resumed"] = state.resumed_count
    report["run"] = {"folder": str(state.folder), "examples": str(state.folder / "examples.jsonl")}
    return _finish(report, state.folder, thresholds, notes)


def _finish(report: dict[str, Any], folder: Path, thresholds: list[Any], notes: list[str]) -> EvalOutcome:
    from eval.gate import check_gates

    gates = check_gates(report, thresholds)
    if gates:
        report["gates"] = gates
    path = _write(folder, report)
    return EvalOutcome(report=report, path=path, summary=_summary(report, path), notes=notes, gates=gates)


def _detector_command(runtime_factory: RuntimeFactory, corpus: Path | None, limit: int | None, out: Path | None,
                      thresholds: list[Any], progress: bool) -> EvalOutcome:
    """``mmrag eval halueval --detector``: the configured support scorer as a detector on HaluEval's pairs."""
    from eval.detector import halueval_pairs, run_detector_eval

    if corpus is None:
        raise BadInputError(f"halueval needs --corpus PATH: {NAMED_DATASETS['halueval']}")
    path = _halueval_path(corpus)
    pairs = halueval_pairs(path, limit)
    started = datetime.now(timezone.utc)
    runtime = runtime_factory()
    with runtime:  # only the support scorer loads: no knowledge base is opened
        scorer = runtime.models.support_scorer
        result = run_detector_eval(scorer, pairs, threshold=runtime.settings.generation.min_support,
                                   progress=progress)
        profile = runtime.settings.profile
    report = {
        "dataset": {"name": "halueval", "given": "halueval", "source": str(path.resolve()), "records": len(pairs),
                    "limit": limit},
        "created": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 2),
        "config": {"detector": True, "profile": profile},
        "detector": result,
    }
    folder = out or Path("mmrag-eval") / f"halueval-detector-{started.strftime('%Y%m%d-%H%M%S')}"
    return _finish(report, folder, thresholds, [])


def summary_table(outcome: EvalOutcome) -> Any:
    """Rich tables: retrieval (one row per mode, one column per metric, latency last; skipped modes say why) and,
    after a generation evaluation, generation (grounded answers, the baseline, the unanswerable questions); for a
    detector run, the detector table; the gates last."""
    from rich.console import Group

    tables = [_detector_table(outcome)] if "detector" in outcome.report else [_retrieval_table(outcome)]
    if "generation" in outcome.report:
        tables.append(_generation_table(outcome))
    if "images" in outcome.report:
        tables.append(_images_table(outcome))
    if outcome.gates:
        tables.append(_gates_table(outcome))
    return tables[0] if len(tables) == 1 else Group(*tables)


def _detector_table(outcome: EvalOutcome) -> Any:
    from rich.table import Table

    data = outcome.report["detector"]
    config = data["config"]
    table = Table(title=f"support scorer {config['scorer']!r} as a hallucination detector on HaluEval "
                        f"({config['pairs']} pairs)")
    names = ("auroc", "f1", "precision", "recall", "best_f1", "best_threshold", "mean_right", "mean_hallucinated")
    table.add_column("answers")
    for name in names:
        table.add_column(name.replace("_", " ").replace("auroc", "AUROC"), justify="right")
    for form, metrics_ in data["forms"].items():
        label = "raw (as shipped)" if form == "raw" else "same sentence form"
        table.add_row(label, *("-" if metrics_[n] is None else f"{metrics_[n]:.3f}" for n in names))
    table.caption = (f"f1/precision/recall: flagging hallucinated answers (support < {config['threshold']}); "
                     "best f1: over all thresholds (optimistic); definitions in report.json")
    return table


def _images_table(outcome: EvalOutcome) -> Any:
    from rich.table import Table

    data = outcome.report["images"]
    summary, config = data["summary"], data["config"]
    table = Table(title=f"images on {outcome.report['dataset']['name']} ({config['model']}, CLIP {config['clip']})")
    for column in ("n", "generated", "failed", "CLIPScore", "CLIP-I", "gold reference", "modes", "p50 s"):
        table.add_column(column, justify="right")

    def cell(value: Any, fmt: str = "{:.3f}") -> str:
        return "-" if value is None else fmt.format(value)

    table.add_row(str(summary["n"]), str(summary["generated"]), str(summary["failed"]), cell(summary["clip_score"]),
                  cell(summary["clip_i"]), cell(summary["gold_reference_rate"]),
                  ", ".join(f"{mode} {n}" for mode, n in summary["modes"].items()) or "-",
                  cell((summary["latency_s"] or {}).get("p50"), "{:.2f}"))
    table.caption = ("CLIPScore: picture vs prompt; CLIP-I: picture vs the gold images; gold reference: pictures "
                     "guided by a gold image; definitions in report.json")
    return table


def _gates_table(outcome: EvalOutcome) -> Any:
    from rich.table import Table

    table = Table(title="gates")
    for column in ("threshold", "value", "result"):
        table.add_column(column)
    for gate in outcome.gates:
        value = "not measured" if gate["value"] is None else f"{gate['value']:.4f}"
        table.add_row(gate["rule"], value, "passed" if gate["passed"] else "FAILED")
    return table


def compare_command(a: Path, b: Path) -> dict[str, Any]:
    """``mmrag eval compare A B``: the metrics of two runs (report.json files or run folders) and B - A."""
    from eval.gate import compare_reports, load_report

    path_a, report_a = load_report(a)
    path_b, report_b = load_report(b)
    rows = compare_reports(report_a, report_b)
    if not rows:
        raise BadInputError(f"neither {str(path_a)!r} nor {str(path_b)!r} holds any metric")
    return {"a": str(path_a), "b": str(path_b), "metrics": rows}


def compare_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="eval compare: B - A")
    for column, justify in (("metric", "left"), ("A", "right"), ("B", "right"), ("delta", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in result["metrics"]:
        delta = row["delta"]
        shown = "-" if delta is None else f"{delta:+.4f}"
        table.add_row(row["metric"], "-" if row["a"] is None else f"{row['a']:.4f}",
                      "-" if row["b"] is None else f"{row['b']:.4f}", shown)
    table.caption = f"A: {result['a']}\nB: {result['b']}"
    return table


def _generation_table(outcome: EvalOutcome) -> Any:
    from rich.table import Table

    data = outcome.report["generation"]
    config = data["config"]

    def cell(value: Any, fmt: str = "{:.3f}") -> str:
        return "-" if value is None else fmt.format(value)

    table = Table(title=f"generation on {outcome.report['dataset']['name']} ({config['model']}, "
                        f"{config['sampling']['max_new_tokens']} new tokens at most)")
    table.add_column("answers")
    for column in ("n", "accuracy", "token F1", "faithful", "halluc.", "cit. precision", "cit. recall",
                   "unsupported", "abstained", "p50 s"):
        table.add_column(column, justify="right")
    rag = data["rag"]
    table.add_row("grounded", str(rag["n"]), cell(rag["accuracy"]), cell(rag["token_f1"]),
                  cell(rag.get("faithfulness")), cell(rag.get("hallucination_rate")),
                  cell(rag["citation_precision"]), cell(rag["citation_recall"]),
                  cell(rag["unsupported_sentence_rate"]), cell(rag["abstention_rate"]),
                  cell(rag["latency_s"]["p50"], "{:.2f}"))
    if "baseline" in data:
        base = data["baseline"]
        table.add_row("baseline (no retrieval)", str(base["n"]), cell(base["accuracy"]), cell(base["token_f1"]),
                      cell(base.get("faithfulness")), cell(base.get("hallucination_rate")),
                      "-", "-", "-", "-", cell(base["latency_s"]["p50"], "{:.2f}"))
    if "unanswerable" in data:
        held = data["unanswerable"]
        reasons = held["by_reason"]
        table.add_row("unanswerable (passage not ingested)", str(held["n"]), "-", "-", "-", "-", "-", "-", "-",
                      f"{cell(held['abstention_rate'])} ({cell(reasons['no-grounding'])} threshold, "
                      f"{cell(reasons['model'])} model)", cell(held["latency_s"]["p50"], "{:.2f}"))
    table.caption = ("accuracy: gold answer contained in the answer; faithful: share of answer sentences the "
                     f"support scorer ({config.get('support_scorer')}) finds backed by the cited or retrieved "
                     "passages; halluc.: answers with an unsupported sentence; citation precision: cited chunks "
                     "from the gold passage; citation recall: answers citing the gold passage; unsupported: "
                     "sentences without a backing citation; definitions in report.json and report.html")
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
