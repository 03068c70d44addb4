"""Eval sets: the ``EvalRecord`` every run consumes, and adapters that turn datasets into records plus a corpus.

A record's gold sources and gold images are file paths. In records that adapters and the JSONL loader return they are
relative to the corpus root (or absolute); ``resolve_gold`` makes them absolute once the corpus is in place, which is
what ``eval.retrieval.run_retrieval_eval`` compares with the ``source`` of each retrieved chunk.

Adapters
--------
- ``halueval(path, limit)``: HaluEval QA (``knowledge``, ``question``, ``right_answer``, ``hallucinated_answer``,
  ``id`` per line). The prompt is the question, the gold answer the right answer, and the corpus the ``knowledge``
  passages: one ``.txt`` file per distinct passage (passages equal up to whitespace are one file, named after the
  first record that has it, ``passage-00012.txt``); a record's gold source is its passage's file.
- ``halueval_held_out(path, after, n)``: the ``n`` HaluEval questions that follow the first ``after`` and whose
  passage is not among theirs: questions the corpus of ``halueval(path, after)`` does not answer (generation
  evaluation asks them to measure abstention). They have a gold answer and no gold sources.
- ``tuxpaint(folder, limit)``: ``captions.jsonl`` (``image`` relative to the folder, ``caption``, ``category``) and
  the images. The prompt is the caption and the gold image the image file; the corpus is the images themselves,
  ingested as stand-alone images, whose searchable context is their file name in words ("0002_peacock.png" ->
  "peacock"): the captions are never in the corpus, so finding an image from its caption is not a string match.
- ``load_jsonl(path, limit)``: a generic eval set, one JSON object per line::

      {"id": "q1",                        optional; default "line-N" (N = 1-based line number)
       "prompt": "What ...?",             required, non-empty
       "gold_answer": "...",              optional
       "gold_sources": ["guide.pdf"],     optional; files whose chunks answer the prompt
       "gold_images": ["img/car.png"],    optional; images that ground the prompt
       "tags": ["cars"]}                  optional

  Paths are relative to the corpus folder (the one that is ingested) or absolute. Blank lines and lines starting
  with ``#`` are skipped; unknown keys are an error (they are usually a typo of a known one). ``mmrag eval`` reports
  each bad line (``file:line: reason``) and runs the others.

With ``limit``, the first ``limit`` records are taken and the corpus holds only their passages or images, so a
limited run searches a smaller corpus than a full one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["Corpus", "CorpusBuilder", "EvalRecord", "halueval", "halueval_held_out", "load_jsonl", "resolve_gold",
           "tuxpaint"]

JSONL_KEYS = frozenset({"id", "prompt", "gold_answer", "gold_sources", "gold_images", "tags"})


@dataclass(frozen=True)
class EvalRecord:
    """One example of an eval set: a prompt and what a grounded answer should rest on."""

    id: str
    prompt: str
    gold_answer: str | None = None
    gold_sources: tuple[str, ...] = ()  # files whose passages answer the prompt
    gold_images: tuple[str, ...] = ()  # image files that ground the prompt
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Corpus:
    """What to ingest for an eval set: the files, and the root that relative gold paths are relative to."""

    root: Path
    files: tuple[Path, ...]


CorpusBuilder = Callable[[Path], Corpus]
"""Builds (or locates) the corpus; its argument is a work folder the builder may write files into."""


def resolve_gold(records: list[EvalRecord], root: Path) -> list[EvalRecord]:
    """The records with every gold path absolute and resolved (relative ones are taken relative to ``root``)."""
    base = Path(root).expanduser().resolve()

    def absolute(paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str((base / Path(p).expanduser()).resolve()) for p in paths)

    return [replace(r, gold_sources=absolute(r.gold_sources), gold_images=absolute(r.gold_images)) for r in records]


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise BadInputError(f"limit must be at least 1, got {limit}")


def _read_jsonl(path: Path, problems: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank, non-comment line; BadInputError naming the first bad line, or
    with ``problems`` given, the bad line's message appended there and the line skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInputError(f"eval set {str(path)!r} does not exist or is not a file")
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"cannot read eval set {str(path)!r}: {exc.strerror or exc}") from exc
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                stripped = line.strip()
                if not stripped or stripped.startswith("#"):
                    continue
                try:
                    data = json.loads(stripped)
                    if not isinstance(data, dict):
                        raise BadInputError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
                except (json.JSONDecodeError, BadInputError) as exc:
                    error = exc if isinstance(exc, BadInputError) else BadInputError(
                        f"{path}:{number}: not valid JSON ({exc.msg})")
                    if problems is None:
                        raise error from exc
                    problems.append(str(error))
                    continue
                yield number, data
        except UnicodeDecodeError as exc:
            raise BadInputError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _string(data: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _strings(data: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise BadInputError(f"{where}: {key!r} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


# -- generic JSONL ----------------------------------------------------------------------------------------------
def load_jsonl(path: Path, limit: int | None = None, *, problems: list[str] | None = None) -> list[EvalRecord]:
    """Records from a JSONL eval set (schema in the module docstring); gold paths stay as written.

    A bad line raises ``BadInputError`` naming it (``path:line: reason``); with a ``problems`` list, its message is
    appended there instead and the other lines still load (an eval set with no good line still raises)."""
    _check_limit(limit)
    records: list[EvalRecord] = []
    seen: set[str] = set()
    for number, data in _read_jsonl(path, problems):
        try:
            record = _jsonl_record(path, number, data, seen)
        except BadInputError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        seen.add(record.id)
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        detail = f": {problems[0]}" + (f" (and {len(problems) - 1} more bad lines)" if len(problems) > 1 else "") \
            if problems else ""
        raise BadInputError(f"eval set {str(path)!r} holds no records{detail}")
    return records


def _jsonl_record(path: Path, number: int, data: dict[str, Any], seen: set[str]) -> EvalRecord:
    """One JSONL line as a record; ``BadInputError`` naming the line when it breaks the schema."""
    where = f"{path}:{number}"
    unknown = sorted(set(data) - JSONL_KEYS)
    if unknown:
        raise BadInputError(f"{where}: unknown keys {unknown}; the schema has {sorted(JSONL_KEYS)}")
    record_id = data.get("id", f"line-{number}")
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        raise BadInputError(f"{where}: 'id' must be a string, got {record_id!r}")
    record_id = str(record_id)
    if record_id in seen:
        raise BadInputError(f"{where}: duplicate id {record_id!r}")
    return EvalRecord(
        id=record_id,
        prompt=_string(data, "prompt", where) or "",
        gold_answer=_string(data, "gold_answer", where, required=False),
        gold_sources=_strings(data, "gold_sources", where),
        gold_images=_strings(data, "gold_images", where),
        tags=_strings(data, "tags", where),
    )


# -- HaluEval ---------------------------------------------------------------------------------------------------
def _passage_key(text: str) -> str:
    return " ".join(text.split())


def halueval(path: Path, limit: int | None = None) -> tuple[list[EvalRecord], CorpusBuilder]:
    """HaluEval QA records (question -> its knowledge passage) and the builder of the passage corpus.

    Gold sources are passage file names relative to the folder the builder writes into."""
    _check_limit(limit)
    records: list[EvalRecord] = []
    passages: dict[str, tuple[str, str]] = {}  # normalised passage -> (file name, text)
    for number, data in _read_jsonl(path):
        where = f"{path}:{number}"
        question = _string(data, "question", where) or ""
        knowledge = _string(data, "knowledge", where) or ""
        answer = _string(data, "right_answer", where, required=False)
        index = len(records)
        key = _passage_key(knowledge)
        if key not in passages:
            passages[key] = (f"passage-{index:05d}.txt", knowledge.strip())
        records.append(EvalRecord(id=str(data.get("id") or f"halueval-{index:05d}"), prompt=question,
                                  gold_answer=answer, gold_sources=(passages[key][0],), tags=("halueval", "qa")))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise BadInputError(f"HaluEval file {str(path)!r} holds no records")
    shared = len(records) - len(passages)
    logger.info("halueval: %d records, %d distinct passages (%d records share one)", len(records), len(passages),
                shared)
    files = dict(passages.values())  # file name -> text

    def build(folder: Path) -> Corpus:
        """Write one .txt file per distinct passage into ``folder`` (unchanged files are left as they are)."""
        root = Path(folder).expanduser().resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
            written = []
            for name, text in files.items():
                target = root / name
                data = text.encode("utf-8") + b"\n"
                if not target.is_file() or target.read_bytes() != data:
                    target.write_bytes(data)
                written.append(target)
        except OSError as exc:
            raise BadInputError(f"cannot write the HaluEval corpus into {str(root)!r}: {exc.strerror or exc}") from exc
        return Corpus(root=root, files=tuple(written))

    return records, build


def halueval_held_out(path: Path, after: int, n: int) -> list[EvalRecord]:
    """Up to ``n`` records after the first ``after`` whose passage none of the first ``after`` records has (their
    questions are not answered by the corpus of ``halueval(path, after)``), in file order; fewer when the file ends.

    A held-out record keeps its question and right answer, has no gold sources, and is tagged ``unanswerable``."""
    _check_limit(n)
    if after < 0:
        raise BadInputError(f"after must be at least 0, got {after}")
    seen: set[str] = set()
    held: list[EvalRecord] = []
    index = -1
    for number, data in _read_jsonl(path):
        where = f"{path}:{number}"
        index += 1
        key = _passage_key(_string(data, "knowledge", where) or "")
        if index < after:
            seen.add(key)
            continue
        if key in seen:  # its passage is in the corpus: answerable after all
            continue
        held.append(EvalRecord(id=str(data.get("id") or f"halueval-{index:05d}"),
                               prompt=_string(data, "question", where) or "",
                               gold_answer=_string(data, "right_answer", where, required=False),
                               tags=("halueval", "qa", "unanswerable")))
        if len(held) >= n:
            break
    return held


# -- Tux Paint stamps -------------------------------------------------------------------------------------------
def tuxpaint(folder: Path, limit: int | None = None) -> tuple[list[EvalRecord], CorpusBuilder]:
    """Caption -> image records over the Tux Paint stamps folder (``captions.jsonl`` + ``images/``), and the
    builder of the image corpus (the image files in place; its work folder argument is not used)."""
    _check_limit(limit)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInputError(f"Tux Paint folder {str(root)!r} does not exist or is not a folder")
    root = root.resolve()
    captions = root / "captions.jsonl"
    if not captions.is_file():
        raise BadInputError(f"{str(root)!r} has no captions.jsonl: point to the folder holding captions.jsonl "
                            "and images/")
    records: list[EvalRecord] = []
    images: list[Path] = []
    for number, data in _read_jsonl(captions):
        where = f"{captions}:{number}"
        relative = _string(data, "image", where) or ""
        caption = _string(data, "caption", where) or ""
        category = data.get("category")
        image = (root / relative).resolve()
        if root not in image.parents:
            raise BadInputError(f"{where}: image path {relative!r} leads outside {str(root)!r}")
        if not image.is_file():
            raise BadInputError(f"{where}: image {relative!r} does not exist")
        tags = ("tuxpaint",) + ((str(category),) if isinstance(category, str) and category else ())
        records.append(EvalRecord(id=f"tuxpaint-{Path(relative).stem}", prompt=caption,
                                  gold_images=(relative,), tags=tags))
        images.append(image)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise BadInputError(f"{str(captions)!r} holds no records")
    distinct = tuple(dict.fromkeys(images))

    def build(folder: Path) -> Corpus:  # noqa: ARG001 - the images are used where they are
        return Corpus(root=root, files=distinct)

    return records, build
