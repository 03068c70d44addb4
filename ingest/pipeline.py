"""The ingest run: sources -> elements -> chunks -> vectors -> Milvus, exact and restartable.

Per source, the order of writes is what makes an interrupted run recoverable by running it again:
  1. image bytes into the content-addressed blob store (same bytes, same key: rewriting is a no-op);
  2. the new version's chunks upserted (ids derive from document, position and content, so a rerun overwrites);
  3. chunks of any other version of the document deleted (searches never see the document missing meanwhile);
  4. the document record, carrying the new version, written last.
A source counts as unchanged only when its record holds the hash of its current bytes, i.e. after step 4. A run
killed anywhere before that leaves the old record, so the same command redoes the source and ends in the state an
uninterrupted run gives. Blobs no chunk references any more are swept at the end of a run that wrote or deleted
any (a marker in the blob store makes the next run sweep when a run is killed before its sweep).

Image and text files are read, parsed, chunked and preprocessed a slice at a time in preparing lanes, one per
core, and each lane also runs the CLIP image tower over its slice's images (with one intra-op thread, so the
lanes overlap one slice's preprocessing with another's forward pass); the main thread and a thread beside it embed
the texts (batched across sources) with the text embedder and CLIP's text tower, sharing the slices of both, each
with one intra-op thread, and the main thread writes (see ``_prepare_all`` and ``_write``). Documents (PDF, DOCX,
PPTX, HTML, Markdown) are parsed in worker processes under a per-file time and memory limit
(``ingest.isolation``), in the background: while the workers parse them, the ingest process prepares and embeds the
other sources, and each document joins the next batch once its elements are back.
"""

from __future__ import annotations

import hashlib
import io
import logging
import mimetypes
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ingest.chunking import Draft, chunk_elements
from ingest.elements import ParseOptions
from ingest.isolation import ISOLATED_KINDS, ParseLimits, parse_isolated, shared_pool
from ingest.parsers import parse_file, sniff_kind
from ingest.parsers._sniff import EXTENSION_KINDS
from ingest.sources import discover
from mmrag.blobs import BlobStore
from mmrag.config import Settings
from mmrag.errors import BadInputError, MmragError, StoreError
from mmrag.index import MAX_TEXT_BYTES, DocRecord, MilvusIndex, clip_text
from mmrag.models import ModelSet
from mmrag.records import Chunk, Document, Failure, IngestReport

logger = logging.getLogger(__name__)

_KIND_MIME = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "html": "text/html", "markdown": "text/markdown", "text": "text/plain",
}


@dataclass
class _Prepared:
    """One source, parsed and chunked, waiting for its vectors."""

    document: Document
    status: str  # added | updated
    chunks: list[Chunk]
    image_pixels: list[Any] = field(default_factory=list)  # CLIP-preprocessed tensors, one per image chunk
    # CLIP vectors of the image chunks, in order, once a preparing lane has embedded them (then image_pixels is
    # emptied); None: embedded when the batch is written.
    image_vectors: np.ndarray | None = None


@dataclass
class _Outcome:
    path: Path
    status: str  # unchanged | failed | prepared
    prepared: _Prepared | None = None
    reason: str = ""


def parse_options(settings: Settings) -> ParseOptions:
    s = settings.ingest
    return ParseOptions(max_image_pixels=s.max_image_pixels, max_archive_bytes=s.max_archive_bytes,
                        max_archive_ratio=s.max_archive_ratio, min_image_side=s.min_image_side,
                        fetch_remote=s.fetch_remote)


def _is_document(path: Path) -> bool:
    """Whether a source is, by its extension, parsed in a worker process (only where it is prepared depends on
    this: the parser follows the content)."""
    return EXTENSION_KINDS.get(path.suffix.lower()) in ISOLATED_KINDS


_text_parser_warm = threading.Event()


def _warm_up_text_parser() -> None:
    """Load the plain-text parser (unstructured's partitioner and its NLP: seconds of imports) in a background
    thread, once per process, while the knowledge base is opened or created; the first text file would otherwise
    wait for it."""
    if _text_parser_warm.is_set():
        return
    _text_parser_warm.set()

    def load() -> None:
        try:
            from ingest.parsers.plain import partition_plain_text

            partition_plain_text("Warm up.\n\nThe text parser is loaded.")
        except Exception:  # noqa: BLE001 - the first text file loads it again and reports what fails
            logger.debug("warming up the text parser failed", exc_info=True)

    threading.Thread(target=load, name="mmrag-text-parser-warm-up", daemon=True).start()


def _distinct(texts: list[str]) -> tuple[list[str], list[int]]:
    """The distinct texts in first-seen order, and each input text's row among them."""
    distinct = list(dict.fromkeys(texts))
    row = {text: i for i, text in enumerate(distinct)}
    return distinct, [row[text] for text in texts]


def _encode_distinct(encode: Any, texts: list[str]) -> np.ndarray:
    """``encode(texts)`` with each distinct text encoded once (a repeated text gets the same vector): image
    contexts taken from one page, headers and footers repeat within a batch."""
    distinct, rows = _distinct(texts)
    if len(distinct) == len(texts):
        return encode(texts)
    return encode(distinct)[rows]


class _SharedEncoding:
    """Two text encoders' work over one batch, shared by two threads.

    Each encoder's distinct texts are sorted by length and taken in slices of ``step`` (so a slice pads little).
    Thread ``i`` takes encoder ``i``'s slices from the front (shortest first) and, once they run out, the other
    encoder's from the back, so both threads stay busy until the batch is done whichever encoder costs more on it:
    MiniLM runs up to 256 tokens and its attention grows with the square of that, CLIP's text tower stops at 77
    tokens, so on long document chunks MiniLM is the slower of the two and on short passages CLIP is. The last
    ``4 * step`` texts go in slices of a quarter of ``step``, so that the thread that runs out first waits for
    less of the other's last slice."""

    def __init__(self, jobs: list[tuple[Any, list[str], int]], step: int) -> None:
        self._lock = threading.Lock()
        self._encode = [encode for encode, _, _ in jobs]
        self._texts: list[list[str]] = []
        self._rows: list[list[int]] = []
        self._out: list[np.ndarray] = []
        self._queues: list[deque[int]] = []
        self._step = step
        self.seconds = [0.0] * len(jobs)
        for _, texts, dim in jobs:
            distinct, rows = _distinct(texts)
            self._texts.append(distinct)
            self._rows.append(rows)
            self._out.append(np.zeros((len(distinct), dim), dtype=np.float32))
            self._queues.append(deque(sorted(range(len(distinct)), key=lambda i: len(distinct[i]))))

    def work(self, own: int) -> None:
        """Encode slices until none is left, encoder ``own``'s first (one intra-op thread: torch keeps the
        number per thread)."""
        import torch

        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        while True:
            with self._lock:
                left = sum(len(queue) for queue in self._queues)
                if not left:
                    return
                size = self._step if left > 4 * self._step else max(1, self._step // 4)
                if self._queues[own]:
                    job, queue = own, self._queues[own]
                    rows = [queue.popleft() for _ in range(min(size, len(queue)))]
                else:
                    job = next(j for j, queue in enumerate(self._queues) if queue)
                    queue = self._queues[job]
                    rows = [queue.pop() for _ in range(min(size, len(queue)))][::-1]
            started = time.perf_counter()
            self._out[job][rows] = self._encode[job]([self._texts[job][r] for r in rows])
            with self._lock:
                self.seconds[job] += time.perf_counter() - started

    def abandon(self) -> None:
        """Leave the slices not yet taken (the other thread stops after its current slice)."""
        with self._lock:
            for queue in self._queues:
                queue.clear()

    def vectors(self, job: int) -> np.ndarray:
        """Encoder ``job``'s vectors, one per input text in input order."""
        return self._out[job][self._rows[job]]


def _lane_slices(items: list[Path], step: int, lanes: int) -> list[list[Path]]:
    """Cut ``items`` into slices of at most ``step`` for ``lanes`` preparing lanes: a multiple of ``lanes``
    slices of even size, so that the lanes finish together, and a first slice of half that size, so that the
    lanes' turns of preparing and embedding interleave (one lane's forward pass beside the other's preparing)
    instead of running in step."""
    if not items:
        return []
    count = -(-len(items) // step)
    if lanes > 1 and count > 1:
        count = -(-count // lanes) * lanes
    size = -(-len(items) // count)
    head = max(1, size // 2) if lanes > 1 and count > 1 else size
    return [items[:head]] + [items[start:start + size] for start in range(head, len(items), size)]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, MmragError) else f"{type(exc).__name__}: {text}"


class Ingestor:
    """Runs ingests against one index, blob store and model set (all owned by the caller)."""

    def __init__(self, settings: Settings, models: ModelSet, index: MilvusIndex, blobs: BlobStore) -> None:
        self.settings = settings
        self.models = models
        self.index = index
        self.blobs = blobs
        self.options = parse_options(settings)
        self.limits = ParseLimits(settings.ingest.parse_timeout_s, settings.ingest.parse_memory_mb)
        self._parse_workers = 1
        self._fresh = False  # the knowledge base was created by the running ingest (embedded store only)
        self._no_leftovers = False  # no earlier run can have left chunks without a record (see ``ingest``)
        self._write_failed = False  # a source failed in this run's writes
        self._stray_blobs = False  # a source failed after storing an image blob in this run
        # Wall seconds per stage of the last ingest (see ``_timed``): where its time went.
        self.timings: dict[str, float] = {}
        # Seconds the preparing lanes spent per stage in the last ingest, summed over lanes (they run beside the
        # stages in ``timings``, so these are not part of its total).
        self.lane_timings: dict[str, float] = {}
        self._embedding_lanes = 0  # preparing lanes running a forward pass now (see ``_write``)
        self._beside: Any = None  # the thread that embeds texts beside the main thread (see ``_write``)
        self._mark_lock = threading.Lock()
        self._marked = False

    # -- the run ----------------------------------------------------------------------------------------------
    def ingest(self, paths: list[Path], *, sync: bool = False, tenant: str | None = None,
               progress: bool = False) -> IngestReport:
        tenant = tenant or self.settings.tenant
        self.timings = {}
        self.lane_timings = {}
        started = time.perf_counter()
        from mmrag.device import configure_threads

        self._parse_workers = configure_threads(self.settings.runtime.torch_threads)  # one per core
        text_encoder = self.models.text_embedder
        clip = self.models.clip
        # 1. Find the sources. A new knowledge base parses every document in it: start the parse workers now, in
        #    the background, while the knowledge base is created (their start-up imports the parsers, seconds).
        found = discover(paths, self.settings.ingest.include, self.settings.ingest.exclude)
        self._fresh = self.index.embedded and not self.index.exists()
        if self._fresh and any(_is_document(p) for p in found.files):
            shared_pool(self._parse_workers).prestart()
        if any(EXTENSION_KINDS.get(p.suffix.lower()) == "text" for p in found.files):
            _warm_up_text_parser()  # in this process: unstructured's text partitioner (seconds to import)
        # 2. Check the knowledge base was filled by the encoders we have (creates it on first use), and find what
        #    it already holds for this tenant.
        with self._timed("knowledge_base"):
            self.index.ensure(text_encoder.signature, clip.signature if clip else None)
            self._marked = self.blobs.pending_gc()  # a killed predecessor left blobs to sweep
            # Every run marks the blob store before its first write and clears the mark only after a run in which
            # every write went through: without a mark, a document without a record has no chunks (one process
            # at a time in the embedded store), and adding it needs no delete of older versions' chunks.
            self._no_leftovers = self.index.embedded and not self._marked
            self._write_failed = False
            self._stray_blobs = False
            known = {d.source: d for d in self.index.documents(tenant)}
        failed = [Failure(m, "no such file or directory") for m in found.missing]
        counts = {"added": 0, "updated": 0, "unchanged": 0, "deleted": 0}
        chunk_counts = {"text": 0, "image": 0}
        from tqdm import tqdm

        bar = tqdm(total=len(found.files), unit="file", desc="ingest", disable=not progress, leave=False)
        pending: list[_Prepared] = []
        from concurrent.futures import ThreadPoolExecutor

        if clip is not None and self._parse_workers > 1:
            self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmrag-embed-beside")
        try:
            # 3. Prepare a slice of sources on every core, then embed and write it in batches.
            for outcome in self._prepare_all(found.files, known, tenant, clip is not None):
                if outcome.status == "unchanged":
                    counts["unchanged"] += 1
                    bar.update(1)
                elif outcome.status == "failed":
                    failed.append(Failure(str(outcome.path), outcome.reason))
                    logger.warning("skipped %s: %s", outcome.path, outcome.reason)
                    bar.update(1)
                else:
                    assert outcome.prepared is not None
                    self._mark_blob_writes()  # replacing a version may orphan its images
                    pending.append(outcome.prepared)
                    if self._batch_full(pending):
                        self._commit(pending, counts, chunk_counts, failed, bar)
                        pending = []
            self._commit(pending, counts, chunk_counts, failed, bar)
            # 4. --sync: sources gone from the walked folders leave the knowledge base.
            if sync:
                seen = {str(p) for p in found.files}
                for root in found.roots:
                    prefix = str(root).rstrip("/") + "/"
                    for source, record in known.items():
                        if source.startswith(prefix) and source not in seen:
                            self._mark_blob_writes()
                            self.index.delete_document(record.doc_id)
                            counts["deleted"] += 1
            # 5. Seal what was written (a reopened embedded store then loads segments instead of replaying its
            #    write log, and BM25 statistics are not rebuilt on every query), then sweep blobs that no
            #    chunk references any more.
            #    A run that only added sources, with no earlier run cut short (see ``_no_leftovers``) and no
            #    source failing after it stored an image, leaves no blob unreferenced: it skips the sweep, which
            #    reads the blob key of every chunk in the knowledge base however few this run wrote.
            if self._marked:
                with self._timed("milvus_flush_and_blob_sweep"):
                    self.index.flush()
                    if not (self._no_leftovers and not self._stray_blobs and not self._write_failed
                            and counts["updated"] == counts["deleted"] == 0):
                        self.blobs.sweep(self.index.blob_keys(), self._sweep_grace())
                    if not self._write_failed:  # a source that failed after its chunks went in may have left them
                        self.blobs.clear_pending_gc()
        finally:
            bar.close()
            if self._beside is not None:
                self._beside.shutdown(wait=True)
                self._beside = None
            import torch

            # The batch writes and the lanes set their own counts, and a thread's count also becomes torch's
            # default for threads started later: restore the process' count.
            torch.set_num_threads(self._parse_workers)
        total = time.perf_counter() - started
        self.timings["waiting_for_preparing"] = total - sum(self.timings.values())
        self.timings["total"] = total
        logger.debug("ingest stages (wall s): %s", {k: round(v, 2) for k, v in self.timings.items()})
        return IngestReport(**counts, failed=tuple(failed), chunks=chunk_counts)

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[stage]`` (main thread only)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def delete(self, doc_ids: list[str], tenant: str | None = None) -> int:
        """Delete documents (chunks, record, then unreferenced blobs); returns how many were deleted."""
        records = [self.index.document(doc_id, tenant) for doc_id in doc_ids]
        self.blobs.mark_pending_gc()
        for record in records:
            self.index.delete_document(record.doc_id)
        self.index.flush()
        self.blobs.sweep(self.index.blob_keys(), self._sweep_grace())
        self.blobs.clear_pending_gc()
        return len(records)

    def _sweep_grace(self) -> float:
        """Blobs written or re-used more recently than this are kept by a sweep. With a Milvus server several
        processes may ingest at once, and another one's blob may be written moments before its chunks: keep
        recent blobs. The embedded store admits one process, so nothing is in flight elsewhere."""
        grace = self.settings.blobs.sweep_grace_s
        if grace is None:
            grace = 0.0 if self.index.embedded else 600.0
        return grace

    def _mark_blob_writes(self) -> None:
        """Before the run's first blob write or delete: leave the marker that makes a successor sweep."""
        with self._mark_lock:
            if not self._marked:
                self.blobs.mark_pending_gc()
                self._marked = True

    # -- preparing (thread pools) ----------------------------------------------------------------------------
    def _prepare_all(self, files: list[Path], known: dict[str, DocRecord], tenant: str,
                     with_clip: bool) -> Iterator[_Outcome]:
        """Prepare every source; outcomes come in the order of ``files`` except that documents come when their
        parse is done (the order of writes does not change what is stored: chunk ids derive from content and
        position).

        Image and text files are prepared in slices of ``image_batch`` files by preparing lanes, one thread per
        core: a lane prepares its slice's files one after another, then runs CLIP's image tower over the slice's
        images with ``cores / lanes`` intra-op threads (torch keeps that setting per thread), up to four slices per
        lane ahead of the writes (a prepared slice holds its chunks and vectors, its pixels are freed), so that
        the lanes keep working while the main thread embeds a long batch of texts. While one lane runs its forward
        pass, the other decodes and resizes (Pillow releases the GIL), and the main thread embeds texts and writes
        (see ``_write``). One forward pass on all cores beside a preparing thread was slower than taking turns
        (their teams' threads wait on each other); two one-thread lanes ran 1.05-1.1x the images/s of one
        two-thread pass over the same batches, and the whole image ingest 1.1-1.5x the earlier turn-taking
        (benchmarks/ingest.py, README "Performance").

        Documents go to the parse worker processes at once, in the background (their threads mostly wait on the
        worker), at most ``lookahead`` of them parsed and waiting to be embedded. The workers' start-up and the
        parsing then run while this process prepares and embeds the other sources, instead of holding up a
        slice; each document is yielded (and joins the next batch) once its parse is done."""
        from concurrent.futures import Future, ThreadPoolExecutor

        workers = self._parse_workers
        step = max(self.settings.ingest.image_batch, 8)
        lookahead = max(step, 4 * workers)
        documents = deque(p for p in files if _is_document(p))
        others = [p for p in files if not _is_document(p)]
        slices = _lane_slices(others, step, workers)
        lanes = max(1, min(workers, len(slices)))
        lane_threads = max(1, workers // lanes)  # a single slice gets every core
        ahead = 4 * lanes  # slices prepared or in preparation and not yet written

        def prepare(path: Path) -> _Outcome:
            return self._prepare(path, known, tenant, with_clip)

        def prepare_slice(paths: list[Path]) -> list[_Outcome]:
            started = time.perf_counter()
            outcomes = [prepare(path) for path in paths]
            self._lane_time("prepare", time.perf_counter() - started)
            if with_clip:
                self._embed_images([o.prepared for o in outcomes if o.prepared is not None], lane_threads)
            return outcomes

        in_flight: deque[Future[_Outcome]] = deque()
        slice_queue = deque(slices)
        sliced: deque[Future[list[_Outcome]]] = deque()
        pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="mmrag-lane")
        with pool, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmrag-document") as parsing:
            def top_up() -> None:
                while documents and len(in_flight) < lookahead:
                    in_flight.append(parsing.submit(prepare, documents.popleft()))

            def top_up_slices() -> None:
                while slice_queue and len(sliced) < ahead:
                    sliced.append(pool.submit(prepare_slice, slice_queue.popleft()))

            try:
                top_up()
                top_up_slices()
                while sliced:
                    outcomes = sliced.popleft().result()
                    top_up_slices()
                    yield from outcomes
                    while in_flight and in_flight[0].done():
                        yield in_flight.popleft().result()
                        top_up()
                while in_flight:
                    yield in_flight.popleft().result()
                    top_up()
            finally:  # stopped early (a store error): prepare and parse nothing more
                documents.clear()
                slice_queue.clear()
                for future in (*in_flight, *sliced):
                    future.cancel()
                pool.shutdown(wait=True)

    def _lane_time(self, stage: str, seconds: float) -> None:
        with self._mark_lock:
            self.lane_timings[stage] = self.lane_timings.get(stage, 0.0) + seconds

    def _embed_images(self, prepared: list[_Prepared], threads: int) -> None:
        """CLIP vectors for the prepared sources' images, in a preparing lane with ``threads`` intra-op threads
        (torch keeps that number per thread). On failure the pixels stay for the batch write, which embeds them
        again and isolates the source that breaks."""
        import torch

        if self.models.clip is None or not any(p.image_pixels for p in prepared):
            return
        started = time.perf_counter()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with self._mark_lock:
            self._embedding_lanes += 1
        try:
            self._embed_pixels(prepared)
        except Exception:  # noqa: BLE001 - see above
            logger.debug("embedding images in a preparing lane failed; left to the batch write", exc_info=True)
            return
        finally:
            with self._mark_lock:
                self._embedding_lanes -= 1
        self._lane_time("clip_image", time.perf_counter() - started)

    def _embed_pixels(self, prepared: list[_Prepared]) -> None:
        """Run CLIP's image tower over the sources' pixels, ``image_batch`` at a time, and give each source its
        vectors (its pixels are then dropped). Nothing changes when the forward pass fails."""
        import torch

        clip = self.models.clip
        assert clip is not None
        pixels = [t for p in prepared for t in p.image_pixels]
        step = self.settings.ingest.image_batch
        vectors = np.concatenate([clip.encode_image_tensors(torch.stack(pixels[s:s + step]))
                                  for s in range(0, len(pixels), step)])
        row = 0
        for item in prepared:
            count = len(item.image_pixels)
            if count:
                item.image_vectors = vectors[row:row + count]
                item.image_pixels = []
                row += count

    def _prepare(self, path: Path, known: dict[str, DocRecord], tenant: str, with_clip: bool) -> _Outcome:
        try:
            size = path.stat().st_size
            limit = self.settings.ingest.max_file_bytes
            if size > limit:
                raise BadInputError(f"file is {size:,} bytes, above the limit of {limit:,} (ingest.max_file_bytes)")
            source = str(path)
            if not source.isprintable() and any("\udc80" <= ch <= "\udcff" for ch in source):
                raise BadInputError(f"the file name is not valid UTF-8 ({ascii(path.name)}): rename the file")
            data = path.read_bytes()
            version = hashlib.sha256(data).hexdigest()
            previous = known.get(source)
            if previous is not None and previous.version == version:
                return _Outcome(path, "unchanged")
            kind = sniff_kind(path, data)
            if kind in ISOLATED_KINDS:  # third-party document parsers: in a worker process, within limits
                elements = parse_isolated(path, data, self.options, self.limits, workers=self._parse_workers)
            else:  # images (Pillow under the pixel limits) and plain text
                elements = parse_file(path, data, self.options)
            doc_id = Document.make_id(source, tenant)
            mime = _KIND_MIME.get(kind) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            document = Document(source=source, doc_id=doc_id, version=version, mime=mime, tenant=tenant,
                                metadata={"name": path.name, "bytes": size})
            settings = self.settings.ingest
            embedder = self.models.text_embedder
            budget = min(settings.chunk_tokens, embedder.max_tokens)
            drafts = chunk_elements(elements, embedder, budget, min(settings.overlap_tokens, budget // 2))
            if not drafts:
                raise BadInputError("no text or images found")
            chunks, pixels = self._to_chunks(document, drafts, with_clip)
            status = "updated" if previous is not None else "added"
            return _Outcome(path, "prepared", _Prepared(document, status, chunks, pixels))
        except MmragError as exc:
            return _Outcome(path, "failed", reason=_one_line(exc))
        except Exception as exc:  # noqa: BLE001 - one broken file never aborts the batch
            logger.debug("unexpected failure on %s", path, exc_info=True)
            return _Outcome(path, "failed", reason=_one_line(exc))

    def _to_chunks(self, document: Document, drafts: list[Draft], with_clip: bool) -> tuple[list[Chunk], list[Any]]:
        from PIL import Image

        clip = self.models.clip if with_clip else None
        chunks: list[Chunk] = []
        pixels: list[Any] = []
        stored = False  # this source has stored an image blob
        try:
            for position, draft in enumerate(drafts):
                meta = dict(draft.meta)
                if draft.bbox is not None:
                    meta["bbox"] = [round(float(v), 2) for v in draft.bbox]
                if draft.modality == "image":
                    assert draft.image is not None
                    fmt = str(meta.get("format") or Image.open(io.BytesIO(draft.image)).format or "png").lower()
                    self._mark_blob_writes()
                    stored = True
                    key = self.blobs.put(draft.image, "jpg" if fmt == "jpeg" else fmt)
                    if clip is not None:
                        pixels.append(clip.preprocess_image(draft.decoded) if draft.decoded is not None
                                      else clip.preprocess_bytes(draft.image))
                    chunk_id = Chunk.make_id(document.doc_id, "image", position, key)
                    chunks.append(Chunk(chunk_id, document.doc_id, "image", blob=key, page=draft.page,
                                        bbox=draft.bbox, order=position, context=clip_text(draft.context, 8192),
                                        metadata=meta))
                else:
                    text = clip_text(draft.text, MAX_TEXT_BYTES)
                    chunk_id = Chunk.make_id(document.doc_id, draft.modality, position, text)
                    chunks.append(Chunk(chunk_id, document.doc_id, draft.modality, text=text, page=draft.page,  # type: ignore[arg-type]
                                        order=position, metadata=meta))
        except BaseException:
            if stored:
                self._stray_blobs = True  # its blobs may be left unreferenced: this run sweeps
            raise
        return chunks, pixels

    # -- embedding and writing (main thread) ------------------------------------------------------------------
    def _batch_full(self, pending: list[_Prepared]) -> bool:
        images = sum(len(p.image_pixels) for p in pending)
        texts = sum(len(p.chunks) for p in pending)
        return images >= self.settings.ingest.image_batch or texts >= 4 * self.settings.ingest.text_batch

    def _commit(self, pending: list[_Prepared], counts: dict[str, int], chunk_counts: dict[str, int],
                failed: list[Failure], bar: Any) -> None:
        if not pending:
            return
        try:
            self._write(pending)
        except StoreError:
            raise  # Milvus or the blob store is down: every source would fail the same way
        except Exception:  # noqa: BLE001 - isolate the source that broke the batch
            logger.debug("batch write failed; retrying its sources one by one", exc_info=True)
            for prepared in pending:
                try:
                    self._write([prepared])
                except StoreError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one broken source never aborts the batch
                    failed.append(Failure(prepared.document.source, _one_line(exc)))
                    self._write_failed = True
                    bar.update(1)
                    continue
                self._count(prepared, counts, chunk_counts, bar)
            return
        for prepared in pending:
            self._count(prepared, counts, chunk_counts, bar)

    @staticmethod
    def _count(prepared: _Prepared, counts: dict[str, int], chunk_counts: dict[str, int], bar: Any) -> None:
        counts[prepared.status] += 1
        for chunk in prepared.chunks:
            chunk_counts["image" if chunk.modality == "image" else "text"] += 1
        bar.update(1)

    def _write(self, pending: list[_Prepared]) -> None:
        """Embed the batch's texts and write it. With more than one core, the text embedder and CLIP's text tower
        share the batch between the main thread and the one beside it, each with one intra-op thread (see
        ``_SharedEncoding``). A model's team of two threads waits on whichever core a preparing lane or a parse
        worker holds, so one-thread models side by side did better within the ingest: three alternating runs over
        the LlamaIndex peer's corpus took 21.2-23.4 s (median 21.3) with each model on its own thread, against
        21.0-29.0 s (median 24.9) one model after the other on both cores. With each model on its own thread, one
        core idled whenever one model finished a batch first (MiniLM on long document chunks, CLIP on short
        passages): sharing the slices, three alternating runs over the same corpus took 17.5-18.6 s (median 17.6)
        against 18.7-20.9 s (median 20.7)."""
        import torch

        chunks = [c for p in pending for c in p.chunks]
        clip = self.models.clip
        embedder = self.models.text_embedder
        text_rows = [i for i, c in enumerate(chunks) if c.modality != "image"] if clip is not None else []
        search_texts = [c.search_text for c in chunks]
        clip_vectors: np.ndarray | None = None
        if clip is not None:
            clip_vectors = np.zeros((len(chunks), clip.signature.dim), dtype=np.float32)
        if text_rows and self._beside is not None:  # both text encoders on both cores (see _SharedEncoding)
            assert clip is not None and clip_vectors is not None
            shared = _SharedEncoding([(embedder.encode, search_texts, embedder.signature.dim),
                                      (clip.encode_texts, [chunks[i].text for i in text_rows], clip.signature.dim)],
                                     self.settings.ingest.text_batch)
            beside = self._beside.submit(shared.work, 1)
            try:
                with self._timed("text_encoders"):
                    shared.work(0)
            except BaseException:
                shared.abandon()  # the beside thread stops after its slice; the batch fails with this error
                futures_wait([beside])
                raise
            with self._timed("text_encoders_waiting_for_beside"):  # the beside thread's last slice
                beside.result()
            self._lane_time("text_embedder", shared.seconds[0])
            self._lane_time("clip_text", shared.seconds[1])
            text_vectors = shared.vectors(0)
            clip_vectors[text_rows] = shared.vectors(1)
        else:
            # The cores the preparing lanes' forward passes leave free (threads of a team that outnumber the free
            # cores spin waiting for each other and slow the lanes down).
            threads = max(1, self._parse_workers - self._embedding_lanes)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            with self._timed("text_embedder"):
                text_vectors = _encode_distinct(embedder.encode, search_texts)
            if text_rows:
                assert clip is not None and clip_vectors is not None
                with self._timed("clip_text"):
                    clip_vectors[text_rows] = _encode_distinct(clip.encode_texts, [chunks[i].text for i in text_rows])
        if clip is not None:
            assert clip_vectors is not None
            image_rows = [i for i, c in enumerate(chunks) if c.modality == "image"]
            if image_rows:
                with self._timed("clip_image"):  # the images no preparing lane has embedded
                    left = [p for p in pending if p.image_pixels]
                    if left:
                        self._embed_pixels(left)
                    clip_vectors[image_rows] = np.concatenate([p.image_vectors for p in pending
                                                               if p.image_vectors is not None])
        with self._timed("milvus_write"):
            by_doc = {p.document.doc_id: p.document for p in pending}
            rows = []
            for i, chunk in enumerate(chunks):
                document = by_doc[chunk.doc_id]
                row = {
                    "id": chunk.id, "doc_id": chunk.doc_id, "tenant": document.tenant, "modality": chunk.modality,
                    "text": chunk.search_text, "source": document.source,
                    "page": chunk.page if chunk.page is not None else -1, "position": chunk.order,
                    "blob": chunk.blob, "version": document.version, "meta": chunk.metadata,
                    "text_vector": text_vectors[i].tolist(),
                }
                if clip_vectors is not None:
                    row["clip_vector"] = clip_vectors[i].tolist()
                rows.append(row)
            self.index.upsert_chunks(rows)
            # Also for "added" sources: a run killed after step 2 on an earlier version left chunks but no record.
            # Not in a knowledge base this run created in the embedded store (one process at a time): it held no
            # chunks before this run, and this run writes each document once; nor where no run left the blob
            # store's mark (see ``ingest``). A delete of one batch's other versions took 0.85 ms per image.
            skip_added = self._fresh or self._no_leftovers
            stale = {p.document.doc_id: p.document.version for p in pending if p.status != "added" or not skip_added}
            if stale:
                self.index.delete_stale(stale)
            self.index.put_document(DocRecord(
                p.document.doc_id, p.document.tenant, p.document.source, p.document.version, p.document.mime,
                n_text=sum(c.modality != "image" for c in p.chunks),
                n_image=sum(c.modality == "image" for c in p.chunks), meta=p.document.metadata) for p in pending)
