"""The Milvus index: one knowledge base = a chunk collection and a document collection.

The chunk collection holds the chunk fields, a text vector (sentence-transformers), a CLIP vector (when CLIP weights
were available when the knowledge base was created), a BM25 sparse vector that Milvus computes from ``text`` with
its BM25 function, and a tenant field (the partition key where the Milvus in use supports it). The document
collection holds one row per ingested source (its version is written last, which is what makes an interrupted ingest
recoverable) and one schema row recording which encoders filled the knowledge base.

The store is chosen by configuration alone: an embedded milvus-lite file under the data dir, or any server URI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrag.config import Settings
from mmrag.encoders import EncoderSignature
from mmrag.errors import EncoderMismatchError, NotFoundError, StoreError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA_ROW = "__schema__"
_SYSTEM_TENANT = "__system__"
MAX_TEXT_BYTES = 65_535
MAX_SOURCE_BYTES = 4_096

# The analyzer of the BM25 field: Milvus' standard tokenizer and lowercase filter, and English stop words dropped.
# The words are those of Milvus' "_english_" list, spelled out, because milvus-lite reads stop_words literally. A
# stop word matches nearly every passage, so it adds next to nothing to a BM25 score, yet scoring it walks its whole
# posting list: milvus-lite 3.2 scores BM25 in Python, term by term (TAAT_NAIVE, its only algorithm), and at 100k
# chunks these words were about 80% of the postings a HaluEval question walked. Fixed when a knowledge base is
# created (milvus.bm25_stop_words = false keeps Milvus' default analyzer); one created before keeps its analyzer.
BM25_STOP_WORDS = ["a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no",
                   "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this",
                   "to", "was", "will", "with"]
BM25_ANALYZER = {"tokenizer": "standard", "filter": ["lowercase", {"type": "stop", "stop_words": BM25_STOP_WORDS}]}

# Fields a chunk row carries besides its vectors (what search and stats return).
CHUNK_FIELDS = ["id", "doc_id", "tenant", "modality", "text", "source", "page", "position", "blob", "version", "meta"]
DOC_FIELDS = ["doc_id", "tenant", "source", "version", "mime", "n_text", "n_image", "meta"]


def quote(value: str) -> str:
    """A Milvus filter string literal."""
    return json.dumps(value, ensure_ascii=False)


def clip_text(value: str, limit: int) -> str:
    """Cut a string to at most ``limit`` UTF-8 bytes without splitting a character."""
    data = value.encode("utf-8")
    if len(data) <= limit:
        return value
    return data[:limit].decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class DocRecord:
    doc_id: str
    tenant: str
    source: str
    version: str
    mime: str = ""
    n_text: int = 0
    n_image: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id, "tenant": self.tenant, "source": clip_text(self.source, MAX_SOURCE_BYTES),
            "version": self.version, "mime": self.mime, "n_text": self.n_text, "n_image": self.n_image,
            "meta": self.meta, "_v": [0.0, 0.0],
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "DocRecord":
        return cls(**{k: row[k] for k in DOC_FIELDS if k in row})


class _Deadlined:
    """A pymilvus connection handler whose calls get ``timeout`` unless they name their own.

    pymilvus' ``QueryIterator`` looks its collection up with no deadline (pymilvus 2.6: ``describe_collection``
    in ``__set_up_collection_id``), so a server that accepts the call and never answers held an iteration, and
    with it an ingest or a delete, for ever."""

    def __init__(self, handler: Any, timeout: float | None) -> None:
        self._handler = handler
        self._timeout = timeout

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._handler, name)
        if self._timeout is None or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self._timeout)
            return attr(*args, **kwargs)

        return call


def _released(exc: Exception) -> bool:
    """A search or query refused because the collection is not loaded (code 101: a restarted server, or another
    client released it)."""
    text = str(getattr(exc, "message", "") or exc)
    return getattr(exc, "code", None) == 101 or "released" in text or "not loaded" in text.lower()


def _connection_lost(exc: Exception) -> bool:
    """The call could not reach the server (gone, restarting): not a timeout of a live but slow or hung one."""
    text = str(getattr(exc, "message", "") or exc)
    return "Fail connecting" in text or "server unavailable" in text or "UNAVAILABLE" in text


def _milvus_error(exc: Exception, uri: str) -> StoreError:
    text = str(getattr(exc, "message", "") or exc)
    if "Open local milvus failed" in text or "lock" in text.lower():
        return StoreError(
            f"the embedded Milvus at {uri} is held by another process (one process may open it at a time); "
            "stop the other mmrag process, or run a Milvus server and pass --milvus-uri")
    if "Fail connecting" in text or "server unavailable" in text:
        return StoreError(f"cannot reach Milvus at {uri}: is the server running? (docker compose up -d milvus)")
    if "DEADLINE_EXCEEDED" in text or "Deadline Exceeded" in text:
        return StoreError(f"Milvus at {uri} did not answer in time (milvus.timeout_s): is the server hung or "
                          "overloaded?")
    return StoreError(f"Milvus at {uri} failed: {text}")


class MilvusIndex:
    """A knowledge base in Milvus. Reads need no encoders; writes and searches check the recorded signature."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uri = settings.milvus_uri
        self.chunks = f"{settings.milvus.collection}_chunks"
        self.docs = f"{settings.milvus.collection}_docs"
        self._client: Any = None
        self._schema: dict[str, Any] | None = None
        self._reload_lock = threading.Lock()
        self._reloading = threading.local()
        self._calling = threading.local()  # depth: this thread's call in flight (its reopening calls pass the gate)
        # Set when the connection to Milvus was lost (a call failed to connect, or the channel is not READY): the
        # next call first opens the knowledge base's collections alone (see _reopen_alone).
        self._reopen = True
        # Creating the knowledge base runs alone: calls of other threads wait for it (see _alone).
        self._gate = threading.Condition()
        self._in_flight = 0
        self._owner: int | None = None

    # -- connection -------------------------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        return self.settings.milvus.uri is None

    @property
    def client(self) -> Any:
        if self._client is None:
            from pymilvus import MilvusClient

            if self.embedded:
                Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            # pymilvus pings an idle connection every 10 s, and Milvus' gRPC server (milvus-lite's too) answers pings
            # that come more often than every 5 minutes without calls with GOAWAY "too_many_pings": a call made as
            # the connection closes then fails UNAVAILABLE. Seen between calls that sit far apart (a minute of
            # image generation between two searches). Ping only while calls are in flight.
            kwargs: dict[str, Any] = {"grpc_options": {"grpc.keepalive_permit_without_calls": False,
                                                       "grpc.keepalive_time_ms": 60_000}}
            if self.settings.milvus.token:
                kwargs["token"] = self.settings.milvus.token
            if self.settings.milvus.db_name:
                kwargs["db_name"] = self.settings.milvus.db_name
            try:
                self._client = MilvusClient(self.uri, **kwargs)
            except Exception as exc:  # noqa: BLE001 - pymilvus raises many types
                raise _milvus_error(exc, self.uri) from exc
            self._reopen = True
        return self._client

    def _channel_dropped(self) -> bool:
        """The client's gRPC channel is not READY: its connection closed (the server went away, even while no call
        was in flight; a channel reconnects only when a call needs it). A pymilvus whose channel cannot be
        inspected answers False: failed calls still mark a lost connection."""
        try:
            from grpc._cython import cygrpc

            channel = self._client._get_connection()._channel._channel
            return channel.check_connectivity_state(False) != cygrpc.ConnectivityState.ready
        except Exception:  # noqa: BLE001 - a diagnostic, never a failure
            return False

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    def __enter__(self) -> "MilvusIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn, *args: Any, **kwargs: Any) -> Any:
        """One Milvus call; its errors become StoreError. pymilvus reconnects by itself once a server is back, but a
        restarted server holds the collections released: the first call that finds them so loads them again and
        is retried once. Client calls are bounded by ``milvus.timeout_s`` (a hung server fails them instead of
        holding them)."""
        if getattr(self._calling, "depth", 0):  # a call made while this thread's call is in flight (a reopening)
            return self._call_once(fn, *args, **kwargs)
        counted = self._enter_call()
        self._calling.depth = 1
        try:
            return self._call_once(fn, *args, **kwargs)
        finally:
            self._calling.depth = 0
            if counted:
                with self._gate:
                    self._in_flight -= 1
                    if not self._in_flight:
                        self._gate.notify_all()

    def _enter_call(self) -> bool:
        """Wait while another thread creates the knowledge base; count this call as in flight (False: the creating
        thread's own call, which is not counted)."""
        me = threading.get_ident()
        with self._gate:
            while self._owner is not None and self._owner != me:
                self._gate.wait()
            if self._owner == me:
                return False
            self._in_flight += 1
            return True

    @contextlib.contextmanager
    def _alone(self) -> Iterator[None]:
        """Run the block with no other call of this index in flight, and hold new ones until it ends.

        ``milvus-lite server`` caches a new collection only after ``create_collection`` has written its schema: a
        call naming it in between (a search while the first upload creates the knowledge base) opens a second copy
        from disk, the same loss as after a restart (see ``_reopen_alone``)."""
        me = threading.get_ident()
        with self._gate:
            while self._owner is not None:
                self._gate.wait()
            self._owner = me
            while self._in_flight:
                self._gate.wait()
        try:
            yield
        finally:
            with self._gate:
                self._owner = None
                self._gate.notify_all()

    def _call_once(self, fn, *args: Any, **kwargs: Any) -> Any:
        if self.settings.milvus.timeout_s and getattr(fn, "__self__", None) is self._client:
            kwargs.setdefault("timeout", self.settings.milvus.timeout_s)
        if not getattr(self._reloading, "active", False) and (self._reopen or self._channel_dropped()):
            self._reopen = True
            self._reopen_alone()
        try:
            return fn(*args, **kwargs)
        except (EncoderMismatchError, NotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001
            if _connection_lost(exc):
                self._reopen = True
            if not _released(exc) or getattr(self._reloading, "active", False):
                raise _milvus_error(exc, self.uri) from exc
            logger.warning("Milvus at %s holds the knowledge base released (a restarted server?): loading it again",
                           self.uri)
        self._reload()
        try:
            return fn(*args, **kwargs)
        except (EncoderMismatchError, NotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise _milvus_error(exc, self.uri) from exc

    def _reopen_alone(self) -> None:
        """After the connection was lost, open the knowledge base's collections before any other call goes out.

        ``milvus-lite server`` opens a collection from disk on the first request that names it, without a lock: two
        requests that arrive together at a restarted server can each open their own copy. One copy is kept; writes
        that went to the other are acknowledged and lost, and its background compaction can rewrite the files and
        the manifest under the kept one, losing rows written long before (benchmarks/milvus_lite_open_race.py
        reproduces it). So the first call after a lost connection opens both collections (a load-state query,
        which any Milvus server answers cheaply) while every other call of this index waits. Calls fail fast as
        before while the server is gone: each one finds the flag still set and fails on its own opening call."""
        with self._reload_lock:
            if not self._reopen:
                return
            self._reloading.active = True
            # A client timeout does not stop the server opening the collection, and the next caller's call would
            # open a second copy beside it: wait longer than milvus.timeout_s (a server that refuses connections
            # still fails this at once).
            wait = max(self.settings.milvus.timeout_s, 30) if self.settings.milvus.timeout_s else None
            try:
                for name in (self.chunks, self.docs):
                    # has_collection only reads the server's catalogue; get_load_state opens the collection. Loading
                    # a released one is left to the call that needs it (_reload).
                    if self._call(self.client.has_collection, name, timeout=wait):
                        self._call(self.client.get_load_state, name, timeout=wait)
                self._reopen = False
            finally:
                self._reloading.active = False

    def _reload(self) -> None:
        """Load the collections again (one thread at a time; the others wait and then find them loaded)."""
        with self._reload_lock:
            self._reloading.active = True
            try:
                self._load()
            finally:
                self._reloading.active = False

    def ping(self, timeout_s: float = 2.0) -> None:
        """A cheap round trip to Milvus (readiness checks); StoreError when it cannot be reached in time."""
        self._call(self.client.has_collection, self.docs, timeout=timeout_s)

    # -- schema -----------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        if self._loaded:
            return True
        found = bool(self._call(self.client.has_collection, self.chunks)) and bool(
            self._call(self.client.has_collection, self.docs))
        if found:
            self._load()
        return found

    _loaded = False

    def _load(self) -> None:
        """Collections reopened from disk (or on a restarted server) must be loaded before reads."""
        for name in (self.chunks, self.docs):
            state = str(self._call(self.client.get_load_state, name).get("state", ""))
            if "Loaded" not in state:
                self._call(self.client.load_collection, name)
        self._loaded = True

    def schema(self) -> dict[str, Any] | None:
        """The recorded schema row: encoder signatures and features, or None before the first ingest."""
        if self._schema is None and self.exists():
            rows = self._call(self.client.get, self.docs, ids=[_SCHEMA_ROW], output_fields=["meta"])
            self._schema = rows[0]["meta"] if rows else None
        return self._schema

    def ensure(self, text: EncoderSignature, clip: EncoderSignature | None) -> dict[str, Any]:
        """Create the knowledge base for these encoders, or check that it was filled by the same ones."""
        wanted = {"schema": SCHEMA_VERSION, "text": text.as_dict(), "clip": clip.as_dict() if clip else None}
        current = self.schema()
        if current is None:
            with self._alone():
                self._create(text, clip)
                features = {**wanted, "partition_key": self._partition_key_used}
                self._call(self.client.upsert, self.docs, [DocRecord(
                    _SCHEMA_ROW, _SYSTEM_TENANT, "", "", meta=features).row()])
            self._schema = features
            return features
        mismatch = [role for role in ("text", "clip") if current.get(role) != wanted[role]]
        if mismatch:
            def show(sig: dict[str, Any] | None) -> str:
                return f"{sig['model']} ({sig['dim']}-d)" if sig else "none"

            detail = "; ".join(f"{role}: collection has {show(current.get(role))}, profile gives {show(wanted[role])}"
                               for role in mismatch)
            raise EncoderMismatchError(
                f"knowledge base {self.settings.milvus.collection!r} was filled by other encoders ({detail}). "
                "Use the profile it was built with, or ingest into another knowledge base "
                "(MMRAG_MILVUS__COLLECTION=name) or delete this one (mmrag delete --all).")
        return current

    _partition_key_used = False

    def _create(self, text: EncoderSignature, clip: EncoderSignature | None) -> None:
        from pymilvus import DataType, Function, FunctionType

        def build(partition_key: bool):
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("doc_id", DataType.VARCHAR, max_length=64)
            schema.add_field("tenant", DataType.VARCHAR, max_length=128, is_partition_key=partition_key)
            schema.add_field("modality", DataType.VARCHAR, max_length=16)
            analyzer = {"analyzer_params": BM25_ANALYZER} if self.settings.milvus.bm25_stop_words else {}
            schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True, **analyzer)
            schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
            schema.add_field("page", DataType.INT64)
            schema.add_field("position", DataType.INT64)
            schema.add_field("blob", DataType.VARCHAR, max_length=512)
            schema.add_field("version", DataType.VARCHAR, max_length=64)
            schema.add_field("meta", DataType.JSON)
            schema.add_field("text_vector", DataType.FLOAT_VECTOR, dim=text.dim)
            if clip is not None:
                schema.add_field("clip_vector", DataType.FLOAT_VECTOR, dim=clip.dim)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                         input_field_names=["text"], output_field_names=["sparse"]))
            return schema

        index = self.client.prepare_index_params()
        dense = {"index_type": self.settings.milvus.index_type, "metric_type": "COSINE",
                 "params": dict(self.settings.milvus.index_params)}
        if dense["index_type"] in {"FLAT", "AUTOINDEX"}:
            dense["params"] = {}
        index.add_index("text_vector", **dense)
        if clip is not None:
            index.add_index("clip_vector", **dense)
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        for name in ("doc_id", "modality"):
            index.add_index(name, index_type="INVERTED")
        # A creation cut short (the process killed, the server gone) can leave the first collection without the
        # second, without its indexes or without the schema row: what exists already is kept, so the next attempt
        # completes it.
        if self._call(self.client.has_collection, self.chunks):
            fields = self._call(self.client.describe_collection, self.chunks).get("fields", [])
            self._partition_key_used = any(f.get("name") == "tenant" and f.get("is_partition_key") for f in fields)
        else:
            try:
                self.client.create_collection(self.chunks, schema=build(True))
                self._partition_key_used = True
            except Exception as exc:  # noqa: BLE001 - older servers refuse partition keys
                logger.info("partition key unavailable (%s); tenant is a filtered field", exc)
                self._call(self.client.create_collection, self.chunks, schema=build(False))
        self._create_indexes(self.chunks, index)
        docs = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        docs.add_field("doc_id", DataType.VARCHAR, is_primary=True, max_length=64)
        docs.add_field("tenant", DataType.VARCHAR, max_length=128)
        docs.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
        docs.add_field("version", DataType.VARCHAR, max_length=64)
        docs.add_field("mime", DataType.VARCHAR, max_length=128)
        docs.add_field("n_text", DataType.INT64)
        docs.add_field("n_image", DataType.INT64)
        docs.add_field("meta", DataType.JSON)
        docs.add_field("_v", DataType.FLOAT_VECTOR, dim=2)  # Milvus requires a vector field
        docs_index = self.client.prepare_index_params()
        docs_index.add_index("_v", index_type="FLAT", metric_type="L2")
        if not self._call(self.client.has_collection, self.docs):
            self._call(self.client.create_collection, self.docs, schema=docs)
        self._create_indexes(self.docs, docs_index)
        self._load()
        logger.info("created knowledge base %s at %s", self.settings.milvus.collection, self.uri)

    def _create_indexes(self, collection: str, params: Any, timeout_s: float = 300.0) -> None:
        """Create the indexes of ``params`` that ``collection`` lacks, and wait until Milvus reports them built.

        pymilvus' own wait (``create_collection`` with index parameters, ``create_index``) sleeps half a second
        before each look, per index: 3 of the 4 seconds that creating a knowledge base took. An index of an empty
        collection is built at once, so this looks again after 10 ms, backing off to half a second."""
        have = set(self._call(self.client.list_indexes, collection))
        wanted = [p for p in params if (p.index_name or p.field_name) not in have]
        if wanted:
            self._call(self.client.create_index, collection, type(params)(wanted), sync=False)
        deadline = time.monotonic() + timeout_s
        pause = 0.01
        for param in wanted:
            name = param.index_name or param.field_name
            while True:
                info = self._call(self.client.describe_index, collection, name)
                state = str(info.get("state", "Finished"))
                if state == "Finished":
                    break
                if state == "Failed":
                    raise StoreError(f"Milvus could not build the {name!r} index of {collection!r}: "
                                     f"{info.get('index_state_fail_reason') or 'no reason given'}")
                if time.monotonic() > deadline:
                    raise StoreError(f"the {name!r} index of {collection!r} was not built within {timeout_s:.0f} s")
                time.sleep(pause)
                pause = min(0.5, pause * 2)

    @property
    def has_clip(self) -> bool:
        schema = self.schema()
        return bool(schema and schema.get("clip"))

    # -- documents --------------------------------------------------------------------------------------------
    def _query_iterator(self, collection: str, expr: str, fields: list[str], batch: int) -> Any:
        """``MilvusClient.query_iterator``, with every call it makes bounded by ``milvus.timeout_s``."""
        from pymilvus.orm.iterator import QueryIterator

        timeout = self.settings.milvus.timeout_s or None
        connection = _Deadlined(self.client._get_connection(), timeout)
        schema, _ = connection._get_schema(collection)
        return QueryIterator(connection=connection, collection_name=collection, batch_size=batch, expr=expr,
                             output_fields=fields, schema=schema, timeout=timeout)

    def _iterate(self, collection: str, expr: str, fields: list[str], batch: int = 1000) -> Iterator[dict[str, Any]]:
        iterator = self._call(self._query_iterator, collection, expr, fields, batch)
        try:
            while True:
                page = self._call(iterator.next)
                if not page:
                    break
                yield from page
        finally:
            iterator.close()

    def documents(self, tenant: str | None = None) -> list[DocRecord]:
        if not self.exists():
            return []
        expr = f"tenant != {quote(_SYSTEM_TENANT)}"
        if tenant is not None:
            expr = f"tenant == {quote(tenant)}"
        return sorted((DocRecord.from_row(r) for r in self._iterate(self.docs, expr, DOC_FIELDS)),
                      key=lambda d: d.source)

    def document(self, doc_id: str, tenant: str | None = None) -> DocRecord:
        rows = self._call(self.client.get, self.docs, ids=[doc_id], output_fields=DOC_FIELDS) if self.exists() else []
        if not rows or rows[0]["tenant"] == _SYSTEM_TENANT or (tenant is not None and rows[0]["tenant"] != tenant):
            raise NotFoundError(f"no document {doc_id!r}" + (f" in tenant {tenant!r}" if tenant else ""))
        return DocRecord.from_row(rows[0])

    def put_document(self, records: Iterable[DocRecord]) -> None:
        rows = [r.row() for r in records]
        if rows:
            self._call(self.client.upsert, self.docs, rows)

    # -- chunks -----------------------------------------------------------------------------------------------
    def upsert_chunks(self, rows: list[dict[str, Any]]) -> None:
        step = self.settings.milvus.write_batch
        for start in range(0, len(rows), step):
            self._call(self.client.upsert, self.chunks, rows[start:start + step])

    def delete_stale(self, versions: dict[str, str]) -> None:
        """Remove chunks of other versions of these documents (``doc_id -> current version``), in one call,
        after their new chunks are in."""
        if not versions:
            return
        expr = " or ".join(f"(doc_id == {quote(d)} and version != {quote(v)})" for d, v in versions.items())
        self._call(self.client.delete, self.chunks, filter=expr)

    def delete_document(self, doc_id: str) -> None:
        """Remove a document's chunks, then its record (so an interrupted delete is retried, never half-done)."""
        self._call(self.client.delete, self.chunks, filter=f"doc_id == {quote(doc_id)}")
        self._call(self.client.delete, self.docs, ids=[doc_id])

    def stored_state(self, doc_id: str, version: str | None) -> str | None:
        """Read back what a write left (strong consistency: a write just acknowledged is visible): None when
        ``version`` is None and nothing of the document is stored, or when its record holds ``version`` and exactly
        the record's chunks of that version are stored; otherwise what differs."""
        strong = {"consistency_level": "Strong"}
        rows = self._call(self.client.get, self.docs, ids=[doc_id], output_fields=DOC_FIELDS, **strong)
        record = DocRecord.from_row(rows[0]) if rows else None
        expr = f"doc_id == {quote(doc_id)}"
        total = self._call(self.client.query, self.chunks, filter=expr, output_fields=["count(*)"], **strong)
        total = int(total[0]["count(*)"]) if total else 0
        if version is None:
            return None if record is None and total == 0 else f"record {record is not None}, {total} chunks left"
        if record is None or record.version != version:
            return f"record of version {record.version[:12] if record else None}, expected {version[:12]}"
        expected = record.n_text + record.n_image
        current = self._call(self.client.query, self.chunks, filter=f"{expr} and version == {quote(version)}",
                             output_fields=["count(*)"], **strong)
        current = int(current[0]["count(*)"]) if current else 0
        if current != expected or total != expected:
            return f"{current} chunks of the version, {total} in all, the record counts {expected}"
        return None

    def delete_all(self) -> None:
        for name in (self.chunks, self.docs):
            if self._call(self.client.has_collection, name):
                self._call(self.client.drop_collection, name)
        self._schema = None
        self._loaded = False

    def flush(self) -> None:
        """Seal the written rows into segments (one call per ingest or delete, not per batch)."""
        for name in (self.chunks, self.docs):
            self._call(self.client.flush, name)

    def chunk_rows(self, expr: str, fields: list[str] | None = None) -> list[dict[str, Any]]:
        if not self.exists():
            return []
        return list(self._iterate(self.chunks, expr, fields or CHUNK_FIELDS))

    def blob_keys(self) -> set[str]:
        return {r["blob"] for r in self.chunk_rows('blob != ""', ["blob"]) if r["blob"]}

    def count(self, expr: str = "") -> int:
        if not self.exists():
            return 0
        rows = self._call(self.client.query, self.chunks, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def stats(self, tenant: str | None = None) -> dict[str, Any]:
        base = f"tenant == {quote(tenant)}" if tenant is not None else ""
        def expr(extra: str) -> str:
            return f"{base} and {extra}" if base else extra
        schema = self.schema() or {}
        docs = self.documents(tenant)
        return {
            "knowledge_base": self.settings.milvus.collection,
            "milvus_uri": self.uri,
            "tenant": tenant,
            "documents": len(docs),
            "chunks": {m: self.count(expr(f"modality == {quote(m)}")) for m in ("text", "table", "image")},
            "encoders": {"text": schema.get("text"), "clip": schema.get("clip")},
            "partition_key": schema.get("partition_key", False),
        }
