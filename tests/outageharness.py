"""Milvus outages under API load: the harness behind tests/test_api_faults.py and benchmarks/outage.py.

The API (``create_app``) is served for real by uvicorn on 127.0.0.1, over a ``milvus-lite server``
(``tests.conftest.MilvusServer``). Client threads keep up a mix of searches, single-file uploads (a short text
with a unique marker, or a PNG of a unique colour), deletes, document lists and generations, while the main thread
stops the server (SIGKILL, SIGTERM), waits, and starts it again on the same port and data dir; or hangs it
(SIGSTOP: the port stays open, nothing answers) and lets it continue (SIGCONT). A poller reads ``/readyz`` all
along.

What a client does, as a well-behaved client would: an upload or a delete that did not get a 2xx answer is tried
again later (its outcome is unknown: it may have been half-applied), until it is acknowledged.

Checks (``OutageRun.problems`` lists every violation):
- every answer is 2xx, or 503 ``store_unavailable`` in the API's error shape ``{"code", "message"}`` with a
  ``Retry-After`` header; no request goes without an answer (transport error, client timeout);
- failures come only while Milvus is down or coming back (none before the first stop, none once recovered);
- the service recovers by itself: searches succeed again after each restart, and ``/readyz`` answers 503 while
  the server is down and 200 after;
- no lost acknowledged writes: at the end the tenant's store holds exactly the acknowledged uploads that were not
  acknowledged as deleted, chunk for chunk (one text or image chunk each, of the uploaded version, the text
  carrying its marker), and nothing else (no orphaned chunks of failed writes, no document of a delete). A lost
  upload is reported with its history (every upload and delete request for it, when, and its answer) and the times
  of the outages; ``writes.rewritten_after_read_back`` counts the uploads and deletes the API's read-back found
  missing and wrote again before answering.
"""

from __future__ import annotations

import io
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.conftest import MilvusServer
from tests.test_api import A as HEADERS
from tests.test_api_server import Served

SENTENCES = [
    "The Citroen DS used hydropneumatic suspension that kept the body level over rough roads.",
    "The Lancia Stratos was built around a mid-mounted Ferrari Dino V6 engine for rallying.",
    "The Saab 99 Turbo brought turbocharging to an affordable family saloon in 1978.",
    "The Volvo P1800 became famous for a single car that covered more than three million miles.",
    "The Alfa Romeo Giulia Sprint GT had a twin-cam engine with an aluminium block.",
    "The Jaguar E-Type was launched at the Geneva Motor Show in March 1961.",
]


@dataclass
class Request:
    kind: str  # search | upload | delete | list | generate
    t0: float
    t1: float
    status: int | None  # None: no answer (transport error or client timeout)
    code: str | None = None
    retry_after: str | None = None
    error: str | None = None
    shape_ok: bool = True
    retry: bool = False  # a write tried again after an answer that was not 2xx

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


@dataclass
class Upload:
    name: str
    data: bytes
    modality: str  # text | image
    marker: str
    doc_id: str | None = None  # from the acknowledging answer
    acknowledged: bool = False
    acked_at: float = 0.0


@dataclass
class Outage:
    signal: str
    stop_at: float  # the signal is sent
    down_at: float  # the process is gone
    back_at: float = 0.0  # the restarted server accepts connections
    restart_s: float = 0.0
    recovered_at: float | None = None  # the first successful search that started after back_at
    ready_at: float | None = None  # the first /readyz 200 after back_at
    missing_after: list[str] = field(default_factory=list)  # uploads acknowledged before it, chunks gone after it


@dataclass
class OutageRun:
    requests: list[Request] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    readyz: list[tuple[float, int | None]] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    retries: Counter = field(default_factory=Counter)
    stored: dict[str, Any] = field(default_factory=dict)
    drained: dict[str, Any] = field(default_factory=dict)  # writes still unacknowledged when the load stopped
    problems: list[str] = field(default_factory=list)
    journal: list[tuple[float, str, str, int | None]] = field(default_factory=list)  # (t, kind, name, status)
    started: float = 0.0
    ended: float = 0.0

    # -- figures ------------------------------------------------------------------------------------------------
    def during_outage(self, request: Request) -> bool:
        """The request overlapped a window from the stop signal to the recovery."""
        for outage in self.outages:
            end = outage.recovered_at or self.ended
            if request.t1 >= outage.stop_at and request.t0 <= end:
                return True
        return False

    LOSS = ("lost their chunks", "acknowledged uploads lost", "acknowledged uploads whose chunks differ")

    def write_losses(self) -> list[str]:
        """The problems that are acknowledged writes missing from the store (the rest: answers and recovery)."""
        return [p for p in self.problems if any(marker in p for marker in self.LOSS)]

    def failures_in(self, outage: Outage) -> list[Request]:
        end = (outage.recovered_at or self.ended) + 1.0
        return [r for r in self.requests if not r.ok and r.t1 >= outage.stop_at and r.t0 <= end]

    def figures(self) -> dict[str, Any]:
        failed = [r for r in self.requests if not r.ok]
        during = [r for r in self.requests if self.during_outage(r)]

        def ms(values: list[float], q: float) -> float | None:
            if not values:
                return None
            values = sorted(values)
            return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1)

        latencies = [r.seconds for r in failed]
        live = [u for u in self.uploads if u.acknowledged and u.doc_id not in self.deleted]
        return {
            "requests": len(self.requests),
            "requests_by_kind": dict(Counter(r.kind for r in self.requests)),
            "during_outages": {"requests": len(during),
                               "statuses": dict(Counter(str(r.status) for r in during)),
                               "by_kind": {k: dict(Counter(str(r.status) for r in during if r.kind == k))
                                           for k in sorted({r.kind for r in during})}},
            "failures": {"count": len(failed), "codes": dict(Counter(f"{r.status} {r.code}" for r in failed)),
                         "with_retry_after": sum(r.retry_after is not None for r in failed),
                         "p50_ms": ms(latencies, 0.5), "p99_ms": ms(latencies, 0.99),
                         "max_ms": ms(latencies, 1.0),
                         "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None},
            "outages": [{"signal": o.signal, "down_s": round(o.back_at - o.stop_at, 2),
                         "failures": len(self.failures_in(o)),
                         "failure_p50_ms": ms([r.seconds for r in self.failures_in(o)], 0.5),
                         "failure_max_ms": ms([r.seconds for r in self.failures_in(o)], 1.0),
                         "server_restart_s": round(o.restart_s, 2),
                         "recovered_after_s": round(o.recovered_at - o.back_at, 2) if o.recovered_at else None,
                         "readyz_200_after_s": round(o.ready_at - o.back_at, 2) if o.ready_at else None,
                         "readyz_503_while_down": sum(1 for t, s in self.readyz if o.down_at < t < o.back_at
                                                      and s == 503),
                         "readyz_samples_while_down": sum(1 for t, _ in self.readyz if o.down_at < t < o.back_at),
                         "acknowledged_uploads_missing_after": len(o.missing_after)}
                        for o in self.outages],
            "writes": {"uploads_acknowledged": sum(u.acknowledged for u in self.uploads),
                       "uploads_never_acknowledged": sum(not u.acknowledged for u in self.uploads),
                       "deletes_acknowledged": len(self.deleted),
                       "retried": dict(self.retries), "after_the_load": self.drained,
                       "checked": len(live), **self.stored},
            "problems": self.problems,
        }


def png(rng: random.Random) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (rng.randint(24, 48), rng.randint(24, 48)),
              (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(out, format="PNG")
    return out.getvalue()


class _Load:
    """The client threads' shared state: what was acknowledged, what must be retried."""

    def __init__(self, url: str, run: OutageRun, seed: int, generate: bool, image_share: float) -> None:
        self.url = url
        self.run = run
        self.generate = generate
        self.image_share = image_share
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.live: list[Upload] = []  # acknowledged, not being deleted
        self.retry_uploads: list[Upload] = []
        self.retry_deletes: list[Upload] = []
        self.deleting: set[str] = set()
        self.counter = 0
        self.rng = random.Random(seed)

    # -- one request ----------------------------------------------------------------------------------------------
    def call(self, client: httpx.Client, kind: str, method: str, path: str, retry: bool = False,
             **kwargs: Any) -> httpx.Response | None:
        t0 = time.monotonic()
        try:
            response = client.request(method, self.url + path, headers=HEADERS, **kwargs)
        except httpx.HTTPError as exc:
            self._record(Request(kind, t0, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}",
                                 retry=retry))
            return None
        t1 = time.monotonic()
        code = None
        shape_ok = True
        if response.status_code >= 400:
            try:
                body = response.json()
                code = body.get("code")
                shape_ok = set(body) == {"code", "message"} and isinstance(body["message"], str)
            except ValueError:
                shape_ok = False
        self._record(Request(kind, t0, t1, response.status_code, code, response.headers.get("retry-after"),
                             shape_ok=shape_ok, retry=retry))
        return response

    def _record(self, request: Request) -> None:
        with self.lock:
            self.run.requests.append(request)

    # -- the operations -------------------------------------------------------------------------------------------
    def new_upload(self, rng: random.Random) -> Upload:
        with self.lock:
            self.counter += 1
            n = self.counter
        marker = f"OUTAGE{n:05d}X{rng.randrange(16 ** 6):06x}"
        if rng.random() < self.image_share:
            upload = Upload(f"{marker.lower()}.png", png(rng), "image", marker)
        else:
            text = f"Record {marker}. {rng.choice(SENTENCES)}"
            upload = Upload(f"{marker.lower()}.txt", text.encode(), "text", marker)
        with self.lock:
            self.run.uploads.append(upload)
        return upload

    def upload(self, client: httpx.Client, upload: Upload) -> None:
        t0 = time.monotonic()
        response = self.call(client, "upload", "POST", "/v1/documents",
                             files=[("files", (upload.name, upload.data, "application/octet-stream"))])
        with self.lock:
            self.run.journal.append((t0, "upload", upload.name, response.status_code if response else None))
        report = response.json() if response is not None and response.status_code == 200 else None
        if report is not None and not report["failed"] and len(report["documents"]) == 1:
            upload.doc_id = report["documents"][0]["doc_id"]
            upload.acknowledged = True
            upload.acked_at = time.monotonic()
            with self.lock:
                self.live.append(upload)
            return
        if report is not None:  # a 200 that refused the file: not a store fault
            with self.lock:
                self.run.problems.append(f"upload {upload.name} answered 200 without ingesting it: {report}")
            return
        with self.lock:
            self.retry_uploads.append(upload)

    def delete(self, client: httpx.Client, upload: Upload, retry: bool = False) -> None:
        with self.lock:
            self.deleting.add(upload.doc_id)
        t0 = time.monotonic()
        response = self.call(client, "delete", "DELETE", f"/v1/documents/{upload.doc_id}", retry=retry)
        status = response.status_code if response is not None else None
        with self.lock:
            self.run.journal.append((t0, "delete", upload.name, status))
            self.deleting.discard(upload.doc_id)
            if status == 200 or (status == 404 and retry):  # a retried delete may find its work done
                self.run.deleted.add(upload.doc_id)
            elif status == 404:
                self.run.problems.append(f"delete of acknowledged {upload.name} answered 404")
            else:
                self.retry_deletes.append(upload)

    def step(self, client: httpx.Client, rng: random.Random) -> None:
        with self.lock:  # one retry a step (a write popped and not sent would never be retried)
            retry_upload = self.retry_uploads.pop(0) if self.retry_uploads and rng.random() < 0.5 else None
            retry_delete = (self.retry_deletes.pop(0) if retry_upload is None and self.retry_deletes
                            and rng.random() < 0.5 else None)
        if retry_upload is not None:
            self.run.retries["upload"] += 1
            self.upload(client, retry_upload)
            return
        if retry_delete is not None:
            self.run.retries["delete"] += 1
            self.delete(client, retry_delete, retry=True)
            return
        roll = rng.random()
        if roll < 0.4:
            self.call(client, "search", "POST", "/v1/search", json={"text": rng.choice(SENTENCES), "k_text": 3,
                                                                     "k_image": 1})
        elif roll < 0.65:
            self.upload(client, self.new_upload(rng))
        elif roll < 0.75:
            with self.lock:
                victim = self.live.pop(rng.randrange(len(self.live))) if len(self.live) > 4 else None
            if victim is not None:
                self.delete(client, victim)
        elif roll < 0.85 or not self.generate:
            self.call(client, "list", "GET", "/v1/documents")
        else:
            self.call(client, "generate", "POST", "/v1/generate",
                      json={"prompt": rng.choice(SENTENCES), "max_new_tokens": 4, "k_text": 2})

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                self.step(client, rng)
                time.sleep(rng.uniform(0.0, 0.05))

    def poll_readyz(self, every_s: float = 0.2) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    status: int | None = client.get(self.url + "/readyz").status_code
                except httpx.HTTPError:
                    status = None
                with self.lock:
                    self.run.readyz.append((time.monotonic(), status))
                time.sleep(every_s)

    def drain(self, deadline_s: float = 300) -> None:
        """After the load: every write whose outcome is unknown is retried until acknowledged."""
        deadline = time.monotonic() + deadline_s
        self.run.drained = {"uploads": len(self.retry_uploads), "deletes": len(self.retry_deletes)}
        first = len(self.run.requests)
        with httpx.Client(timeout=60) as client:
            while (self.retry_uploads or self.retry_deletes) and time.monotonic() < deadline:
                if self.retry_uploads:
                    self.run.retries["upload"] += 1
                    self.upload(client, self.retry_uploads.pop(0))
                if self.retry_deletes:
                    self.run.retries["delete"] += 1
                    self.delete(client, self.retry_deletes.pop(0), retry=True)
        self.run.drained["statuses"] = dict(Counter(str(r.status) for r in self.run.requests[first:]))
        if self.retry_uploads or self.retry_deletes:
            self.run.problems.append(f"{len(self.retry_uploads)} uploads and {len(self.retry_deletes)} deletes "
                                     f"still failing {deadline_s:.0f} s after the load")


def run_outages(app: Any, server: MilvusServer, *, signals: tuple[str, ...] = ("SIGKILL", "SIGTERM"),
                warmup_s: float = 4.0, down_s: float = 5.0, settle_s: float = 5.0, clients: int = 3,
                generate: bool = True, image_share: float = 0.25, seed: int = 0, fail_fast_s: float = 5.0,
                recover_within_s: float = 30.0) -> OutageRun:
    """Serve ``app`` (its runtime's Milvus is ``server``), keep the load up, stop and restart the server once per
    signal, then check every answer and the store. ``fail_fast_s``: the slowest failure allowed."""
    run = OutageRun()
    with Served(app) as served:
        load = _Load(served.url, run, seed, generate, image_share)
        threads = [threading.Thread(target=load.worker, args=(seed * 1000 + i,), daemon=True)
                   for i in range(clients)]
        threads.append(threading.Thread(target=load.poll_readyz, daemon=True))
        run.started = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            # Warm up: the load reaches a steady state (the first upload creates the knowledge base) before the
            # first fault, so that writes acknowledged before it are checked too.
            deadline = time.monotonic() + warmup_s + 120
            while time.monotonic() < deadline and not (
                    sum(u.acknowledged for u in list(run.uploads)) >= 3
                    and any(r.ok and r.kind == "search" for r in list(run.requests))):
                time.sleep(0.1)
            time.sleep(warmup_s)
            for name in signals:
                stop_at = time.monotonic()
                if name == "SIGSTOP":  # hung, not gone: connections stay open and nothing answers
                    server.pause()
                else:
                    server.stop(name)
                outage = Outage(name, stop_at, time.monotonic())
                run.outages.append(outage)
                time.sleep(down_s)
                if name == "SIGSTOP":
                    server.resume()
                else:
                    outage.restart_s = server.start()
                outage.back_at = time.monotonic()
                deadline = outage.back_at + recover_within_s
                while time.monotonic() < deadline and outage.recovered_at is None:
                    time.sleep(0.1)
                    _mark_recovery(run, outage)
                time.sleep(settle_s)
                _mark_recovery(run, outage)
                outage.missing_after = _missing_chunks(run, app, load, before=outage.stop_at)
        finally:
            load.stop.set()
            for thread in threads:
                thread.join(120)
        run.ended = time.monotonic()
        load.drain()
        check(run, app, fail_fast_s)
    return run


def _missing_chunks(run: OutageRun, app: Any, load: _Load, before: float) -> list[str]:
    """Uploads acknowledged before ``before`` (and not deleted, nor being deleted) whose chunks are not in the
    store now: which outage lost a write, while the load goes on."""
    with load.lock:
        pending = {u.doc_id for u in load.retry_deletes} | run.deleted
        acknowledged = [u for u in run.uploads if u.acknowledged and u.acked_at < before and u.doc_id not in pending]
    try:
        present = {r["doc_id"] for r in app.state.api.runtime.index.chunk_rows('tenant == "acme"', ["doc_id"])}
    except Exception as exc:  # noqa: BLE001 - a diagnostic: a failure to read is recorded, not raised
        return [f"unreadable: {exc}"]
    with load.lock:  # a delete may have started meanwhile
        pending = {u.doc_id for u in load.retry_deletes} | run.deleted | load.deleting
    return [u.name for u in acknowledged if u.doc_id not in present and u.doc_id not in pending]


def _mark_recovery(run: OutageRun, outage: Outage) -> None:
    searches = [r.t1 for r in list(run.requests) if r.kind == "search" and r.ok and r.t0 >= outage.back_at]
    outage.recovered_at = min(searches) if searches else None
    ready = [t for t, s in list(run.readyz) if s == 200 and t >= outage.back_at]
    outage.ready_at = min(ready) if ready else None


def check(run: OutageRun, app: Any, fail_fast_s: float) -> None:
    """Fill ``run.problems`` with every violation (see the module's docstring) and ``run.stored`` with the counts."""
    problems = run.problems
    retry_after = str(app.state.api.api.retry_after_s)
    for r in run.requests:
        where = f"{r.kind} at {r.t0 - run.started:.2f}s"
        if r.status is None:
            problems.append(f"{where}: no answer ({r.error})")
            continue
        if r.ok or (r.retry and r.kind == "delete" and r.status == 404):
            continue  # a retried delete may find that the first attempt was applied after all (see below)
        if r.status != 503 or r.code != "store_unavailable" or not r.shape_ok:
            problems.append(f"{where}: answered {r.status} {r.code} (shape ok: {r.shape_ok})")
        if r.retry_after != retry_after:
            problems.append(f"{where}: 503 with Retry-After {r.retry_after!r}, expected {retry_after!r}")
        if r.seconds > fail_fast_s:
            problems.append(f"{where}: failed after {r.seconds:.1f} s (limit {fail_fast_s} s)")
        # Allowed from the stop signal until a second after the first search succeeded again.
        if not any(r.t1 >= o.stop_at and r.t0 <= (o.recovered_at or run.ended) + 1.0 for o in run.outages):
            problems.append(f"{where}: failed outside any outage (Milvus was up)")
    for i, outage in enumerate(run.outages):
        if outage.missing_after:
            problems.append(f"outage {i + 1} ({outage.signal}): uploads acknowledged before it lost their chunks: "
                            f"{outage.missing_after[:10]} ({len(outage.missing_after)})")
        if outage.recovered_at is None:
            problems.append(f"outage {i + 1} ({outage.signal}): no search succeeded after Milvus came back")
        if outage.ready_at is None:
            problems.append(f"outage {i + 1} ({outage.signal}): /readyz never answered 200 after Milvus came back")
        down = [s for t, s in run.readyz if outage.down_at < t < outage.back_at]
        if not down or any(s != 503 for s in down):
            problems.append(f"outage {i + 1} ({outage.signal}): /readyz while Milvus was down: {Counter(down)}")
    if not any(r.ok for r in run.requests if r.kind == "upload" and r.t0 > run.outages[-1].back_at):
        problems.append("no upload succeeded after the last restart")
    problems.extend(check_store(run, app))


def check_store(run: OutageRun, app: Any) -> list[str]:
    """The tenant's store equals the acknowledged writes, chunk for chunk."""
    from mmrag.index import quote

    index = app.state.api.runtime.index
    tenant = "acme"
    problems: list[str] = []
    expected = {u.doc_id: u for u in run.uploads if u.acknowledged and u.doc_id not in run.deleted}
    records = {d.doc_id: d for d in index.documents(tenant)}
    rows = index.chunk_rows(f"tenant == {quote(tenant)}")
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_doc.setdefault(row["doc_id"], []).append(row)
    lost = [u.name for doc_id, u in expected.items() if doc_id not in records]
    if lost:
        problems.append(f"acknowledged uploads lost: {lost}")
    extra = sorted(set(records) - set(expected))
    if extra:
        problems.append(f"documents present that are not acknowledged-live (deleted or never acknowledged): "
                        f"{[records[d].source for d in extra]}")
    orphans = sorted(set(by_doc) - set(records))
    if orphans:
        problems.append(f"chunks without a document record (doc ids): {orphans}")
    wrong = []
    for doc_id, upload in expected.items():
        record = records.get(doc_id)
        chunks = by_doc.get(doc_id, [])
        modalities = sorted(c["modality"] for c in chunks)
        if record is None or modalities != [upload.modality] or any(c["version"] != record.version for c in chunks):
            wrong.append((upload.name, modalities))
        elif upload.modality == "text" and upload.marker not in chunks[0]["text"]:
            wrong.append((upload.name, "marker missing"))
        elif (record.n_text, record.n_image) != ((1, 0) if upload.modality == "text" else (0, 1)):
            wrong.append((upload.name, f"record counts {record.n_text}/{record.n_image}"))
    if wrong:
        problems.append(f"acknowledged uploads whose chunks differ: {wrong}")
    for name in sorted({w[0] for w in wrong} | set(lost))[:5]:  # what the clients did with them, and when
        history = [(round(t - run.started, 2), kind, status) for t, kind, n, status in run.journal if n == name]
        outages = [(o.signal, round(o.stop_at - run.started, 2), round(o.back_at - run.started, 2))
                   for o in run.outages]
        problems.append(f"history of {name}: {history}; outages (signal, stop, back): {outages}")
    for doc_id in run.deleted:
        if doc_id in records or doc_id in by_doc:
            problems.append(f"acknowledged delete of {doc_id} still present")
    registry = app.state.api.metrics.registry
    repairs = {kind: int(registry.get_sample_value("mmrag_store_repairs_total", {"kind": kind}) or 0)
               for kind in ("upload", "delete")}
    run.stored = {"documents_stored": len(records), "chunks_stored": len(rows), "lost": len(lost),
                  "unexpected_documents": len(extra), "orphaned_chunks": sum(len(by_doc[d]) for d in orphans),
                  "wrong_chunks": len(wrong), "rewritten_after_read_back": repairs}
    return problems
