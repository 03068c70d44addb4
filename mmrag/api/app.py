"""The HTTP API: ``create_app(settings | runtime)`` builds a FastAPI app over one ``Runtime``.

The models and the Milvus connection load once, on a thread started by the lifespan: ``/healthz`` answers at once,
``/readyz`` and every ``/v1`` endpoint answer 503 ``not_ready`` until they are loaded. Every ``/v1`` request is
authenticated (``mmrag.api.auth``) and confined to its key's tenant: documents, hits, images and eval jobs of
another tenant answer exactly as ids that do not exist. Errors are JSON ``{"code", "message"}``
(``mmrag.api.errors``); limits live in ``[api]`` (``mmrag.config.ApiSection``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmrag.api.auth import Authenticator, Principal, is_loopback
from mmrag.api.errors import ApiError, not_found, status_of
from mmrag.api.jobs import EvalJob, EvalJobs
from mmrag.api.limits import BodyLimitMiddleware, GenerationGate, inside, safe_upload_name, tenant_folder
from mmrag.api.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from mmrag.api.schemas import (ERROR_RESPONSES, Deleted, DocumentList, DocumentOut, EvalJobList, EvalJobOut,
                               EvalRequest, GeneratedOut, GenerateRequest, GroundingOut, Health, IngestReportOut,
                               PathsRequest, Ready, SearchRequest)
from mmrag.api.shapes import grounding_json
from mmrag.blobs import BlobStore
from mmrag.config import Settings
from mmrag.errors import MmragError, ModelUnavailableError, NotFoundError, StoreError
from mmrag.index import quote
from mmrag.records import Document
from mmrag.runtime import Runtime

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_CHUNK_ID = re.compile(r"^[0-9a-f]{32}$")
_GENERATED_ID = re.compile(r"^gen-([0-9a-f]{64})\.(png|jpg|jpeg|webp|gif)$")
_MEDIA = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif",
          "bmp": "image/bmp", "tiff": "image/tiff", "tif": "image/tiff"}
_COPY_STEP = 1024 * 1024
# One server-sent event of a streamed answer (OpenAPI 3.1 describes an event stream event by event).
_SSE_EVENT = {
    "type": "object", "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["token", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": 'JSON: {"text"} for token; the full answer (as without streaming) for done; '
                                '{"code", "message"} for error'},
    },
}


class ApiState:
    """What the app's requests share: one runtime, the auth table, the generation gate, metrics, eval jobs."""

    def __init__(self, runtime: Runtime, owns_runtime: bool) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings
        self.owns_runtime = owns_runtime
        self.api = self.settings.api
        self.auth = Authenticator(self.settings)
        self.gate = GenerationGate(self.api.max_concurrent_generations, self.api.max_queued_generations,
                                   self.api.queue_timeout_s, self.api.retry_after_s)
        self.metrics = Metrics()
        self.write_lock = threading.Lock()  # ingests and deletes run one at a time (reads run beside them)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.loaded: dict[str, str | None] = {}
        self.upload_root = Path(self.api.upload_dir or self.settings.data_dir / "uploads").expanduser()
        # Generated images: a store of their own (an ingest sweeps every key its knowledge base does not reference).
        self.generated = BlobStore(f"{self.settings.blob_url}-generated", self.settings.blobs.storage_options)
        self.jobs = EvalJobs(Path(self.settings.data_dir).expanduser() / "api-evals", self._run_eval)
        self._generator: Any = None
        self._generator_lock = threading.Lock()

    # -- loading ------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the models and connect to Milvus (on the lifespan's thread); readiness follows."""
        try:
            models = self.runtime.models
            self.loaded["text_embedder"] = models.text_embedder.signature.model
            clip = models.clip
            self.loaded["clip"] = clip.signature.model if clip is not None else None
            try:
                self.runtime.index.exists()  # connects and loads the collections
            except StoreError as exc:  # a Milvus outage is not a failed start: /readyz says 503 until it is back
                logger.warning("%s", exc)
            if self.settings.models.llm is not None:
                try:
                    self.loaded["llm"] = models.llm.name
                except ModelUnavailableError as exc:  # search still works; generate answers 503 with this reason
                    logger.warning("%s", exc)
                    self.loaded["llm"] = None
                try:  # the citation check's scorer: loaded now, so a broken path shows at start, not per request
                    self.loaded["support_scorer"] = models.support_scorer.name
                except ModelUnavailableError as exc:  # generate answers 503 with this reason
                    logger.warning("%s", exc)
                    self.loaded["support_scorer"] = None
            if self.settings.models.image_generator is not None and models.resolution("image_generator").available:
                try:  # loaded now, not by the first request that asks for images
                    self.loaded["image_generator"] = models.image_generator.name
                except ModelUnavailableError as exc:  # answers then carry image_error with this reason
                    logger.warning("%s", exc)
                    self.loaded["image_generator"] = None
            self.ready.set()
            logger.info("ready: %s", self.loaded)
        except Exception as exc:  # noqa: BLE001 - readiness reports it; the process stays up for /healthz
            self.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, MmragError) else str(exc)
            logger.error("loading failed: %s", self.load_error)

    @property
    def generator(self) -> Any:
        with self._generator_lock:
            if self._generator is None:
                from generation.grounded import GroundedGenerator

                self._generator = GroundedGenerator(self.runtime)
            return self._generator

    def tenant_dir(self, tenant: str) -> Path:
        return self.upload_root / tenant_folder(tenant)

    # -- images -------------------------------------------------------------------------------------------------
    def publish_images(self, answer: dict[str, Any], tenant: str) -> dict[str, Any]:
        """Generated images carry a server file ``path``: store each in the tenant's part of the generated-image
        store and give its URL instead (server paths never leave the server)."""
        published = []
        for image in answer.get("images") or []:
            entry = dict(image) if isinstance(image, dict) else {"value": image}
            path = entry.pop("path", None)
            if path:
                try:
                    data = Path(path).read_bytes()
                    ext = (Path(path).suffix.lstrip(".").lower() or "png")
                    ext = ext if ext in _MEDIA else "png"
                    digest = hashlib.sha256(data).hexdigest()
                    self._store_generated(tenant, digest, ext, data)
                    self._drop_staged(Path(path))
                    entry["id"] = f"gen-{digest}.{ext}"
                    entry["url"] = f"/v1/images/gen-{digest}.{ext}"
                except OSError as exc:
                    logger.warning("generated image %s unreadable: %s", path, exc)
                    entry["url"] = None
                    entry["error"] = "the generated image could not be read"
            published.append(entry)
        return answer | {"images": published}

    def _drop_staged(self, path: Path) -> None:
        """A generated file written to this app's staging folder is removed once published."""
        staging = (Path(self.settings.data_dir).expanduser() / "api-staging").resolve()
        resolved = path.resolve()
        if staging in resolved.parents:
            resolved.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                resolved.parent.rmdir()

    def _store_generated(self, tenant: str, digest: str, ext: str, data: bytes) -> None:
        """Under the tenant's folder of the generated-image store: another tenant's key never names it."""
        location = self.generated._path(f"{tenant_folder(tenant)}/{digest}.{ext}")
        if not self.generated.local:
            self.generated.fs.pipe_file(location, data)
            return
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a reader never sees half an image

    def image_bytes(self, image_id: str, tenant: str) -> tuple[bytes, str]:
        match = _GENERATED_ID.match(image_id)
        if match:
            digest, ext = match.groups()
            try:
                return self.generated.get(f"{tenant_folder(tenant)}/{digest}.{ext}"), _MEDIA[ext]
            except NotFoundError:
                raise not_found("image") from None
        if not _CHUNK_ID.match(image_id):
            raise not_found("image")
        rows = self.runtime.index.chunk_rows(
            f"id == {quote(image_id)} and tenant == {quote(tenant)} and modality == \"image\"", ["id", "blob"])
        if not rows or not rows[0].get("blob"):
            raise not_found("image")
        key = rows[0]["blob"]
        try:
            data = self.runtime.blobs.get(key)
        except NotFoundError:
            raise not_found("image") from None
        return data, _MEDIA.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")

    # -- evals --------------------------------------------------------------------------------------------------
    def _run_eval(self, job: EvalJob, options: dict[str, Any]) -> dict[str, Any]:
        from eval.cli import eval_command, merge_overrides

        base = self.settings

        def runtime_factory(**overrides: Any) -> Runtime:
            settings = type(base).model_validate(merge_overrides(base.model_dump(), overrides))
            return Runtime(settings, models=self.runtime.models)

        outcome = eval_command(runtime_factory, options["dataset"], options["corpus"], options["limit"], job.folder,
                               options["retrieval_only"], True, max_new_tokens=options["max_new_tokens"])
        summary = dict(outcome.summary)
        summary["report"] = "report.json"
        summary["notes"] = list(outcome.notes)
        return summary

    def close(self) -> None:
        self.jobs.shutdown()
        if self.owns_runtime:
            self.runtime.close()


# -- dependencies ---------------------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


def _state(request: Request) -> ApiState:
    return request.app.state.api


def principal(request: Request, bearer: Any = Depends(_bearer), header_key: str | None = Depends(_key_header),
              ) -> Principal:
    """The caller's tenant, from its API key; 401 without a known key (the same answer for none and a wrong one)."""
    state = _state(request)
    if not state.auth.enabled:
        host = request.client.host if request.client else None
        if not is_loopback(host):
            raise ApiError(403, "forbidden", "this server runs without API keys and serves loopback clients only")
        return Principal(state.settings.tenant)
    key = header_key or (bearer.credentials if bearer is not None else None)
    found = state.auth.authenticate(key) if key else None
    if found is None:
        raise ApiError(401, "unauthorized", "a valid API key is required: send `Authorization: Bearer KEY` or "
                                            "`X-API-Key: KEY`", headers={"WWW-Authenticate": "Bearer"})
    return found


def ready_state(request: Request) -> ApiState:
    state = _state(request)
    if not state.ready.is_set():
        if state.load_error:
            raise ApiError(503, "not_ready", f"the server failed to load: {state.load_error}")
        raise ApiError(503, "not_ready", "models are still loading; retry shortly",
                       headers={"Retry-After": str(state.api.retry_after_s)})
    return state


# -- checks ---------------------------------------------------------------------------------------------------------
def _check_k(state: ApiState, **ks: int | None) -> None:
    for name, k in ks.items():
        if k is not None and k > state.api.max_k:
            raise ApiError(400, "k_too_large", f"{name} is {k}; the limit is {state.api.max_k} (api.max_k)")


def _check_text(state: ApiState, text: str | None, what: str) -> None:
    if text and len(text) > state.api.max_prompt_chars:
        raise ApiError(400, "prompt_too_long", f"the {what} is {len(text):,} characters; the limit is "
                                               f"{state.api.max_prompt_chars:,} (api.max_prompt_chars)")


def _decode_image(state: ApiState, encoded: str) -> bytes:
    payload = encoded.split(",", 1)[1] if encoded.startswith("data:") and "," in encoded else encoded
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_image", "image must be base64-encoded image bytes (PNG, JPEG, ...)") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(400, "bad_image", "image bytes are not a readable image (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError:
        width = height = state.api.max_image_pixels + 1
    if width * height > state.api.max_image_pixels:
        raise ApiError(400, "image_too_large", f"the image has {width * height:,} pixels; the limit is "
                                               f"{state.api.max_image_pixels:,} (api.max_image_pixels)")
    return data


def _document_json(record: Any) -> dict[str, Any]:
    meta = dict(record.meta or {})
    return {"doc_id": record.doc_id, "source": record.source, "name": meta.get("name") or Path(record.source).name,
            "version": record.version, "mime": record.mime, "chunks": {"text": record.n_text, "image": record.n_image},
            "meta": meta}


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# -- the app --------------------------------------------------------------------------------------------------------
def create_app(target: Settings | Runtime) -> FastAPI:
    """The app over a runtime (shared with the caller, who closes it) or over settings (the app builds and closes
    its own runtime)."""
    runtime = target if isinstance(target, Runtime) else Runtime(target)
    state = ApiState(runtime, owns_runtime=not isinstance(target, Runtime))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="mmrag-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await run_in_threadpool(loader.join)
            state.close()

    app = FastAPI(
        title="mmrag", version="0.1.0", lifespan=lifespan,
        description="Grounded multimodal generation over a Milvus knowledge base: upload documents, search for "
                    "grounding, generate cited answers (streamed or not), run evaluations. Every /v1 call needs an "
                    "API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`) and sees only its tenant's data. "
                    "Errors are JSON {code, message}.")
    app.state.api = state
    # Outermost first: metrics see every final status; the catch-all turns an unexpected error into JSON.
    app.user_middleware.clear()
    app.add_middleware(BodyLimitMiddleware, limit=state.api.max_request_bytes)
    app.add_middleware(_CatchAllMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)

    # -- error handlers --------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(MmragError)
    async def _project_error(request: Request, exc: MmragError) -> JSONResponse:
        status, code = status_of(exc)
        if status >= 500:
            logger.error("%s: %s", code, exc)
        # A store outage is transient: clients are told when to retry (a 503 without it invites a retry storm).
        headers = {"Retry-After": str(state.api.retry_after_s)} if isinstance(exc, StoreError) else None
        return JSONResponse({"code": code, "message": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
                             for err in exc.errors()[:5])
        return JSONResponse({"code": "invalid_request", "message": f"the request does not match the schema: "
                                                                   f"{problems}"[:2000]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "request_too_large"}
        return JSONResponse({"code": codes.get(exc.status_code, f"http_{exc.status_code}"), "message": str(exc.detail)},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    # -- health ----------------------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
    def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, tags=["health"], summary="Models and Milvus are loaded",
             responses={503: {"model": Ready, "description": "Still loading, or loading failed"}})
    def readyz() -> Response:
        if state.ready.is_set():
            try:
                state.runtime.index.ping()  # one cheap round trip: a Milvus outage makes the replica not ready
            except StoreError as exc:
                return JSONResponse({"ready": False, "status": "store_unavailable", "detail": str(exc),
                                     "models": state.loaded, "auth": state.auth.enabled}, status_code=503,
                                    headers={"Retry-After": str(state.api.retry_after_s)})
            body = {"ready": True, "status": "ready", "detail": None, "models": state.loaded,
                    "auth": state.auth.enabled}
            return JSONResponse(body)
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"ready": False, "status": status, "detail": state.load_error, "models": state.loaded,
                             "auth": state.auth.enabled}, status_code=503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics() -> Response:
        state.metrics.generations_running.set(state.gate.admitted)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # -- documents -------------------------------------------------------------------------------------------
    upload_body = {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/json": {"schema": PathsRequest.model_json_schema(ref_template="#/components/schemas/"
                                                                                        "{model}")},
        },
    }

    @app.post("/v1/documents", response_model=IngestReportOut, tags=["documents"],
              summary="Ingest uploaded files (multipart) or server-side paths (JSON)",
              openapi_extra={"requestBody": upload_body},
              responses=ERROR_RESPONSES | {415: {"model": ERROR_RESPONSES[400]["model"],
                                                 "description": "Neither multipart nor JSON"}})
    async def add_documents(request: Request, who: Principal = Depends(principal),
                            st: ApiState = Depends(ready_state)) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=st.api.max_files, max_fields=st.api.max_files + 16)
            except StarletteHTTPException as exc:
                if "Too many files" in str(exc.detail):
                    raise ApiError(413, "too_many_files", f"at most {st.api.max_files} files per request "
                                                          "(api.max_files)") from None
                raise ApiError(400, "bad_multipart", f"unreadable multipart body: {exc.detail}") from None
            try:
                uploads = [item for field, item in form.multi_items() if field == "files"
                           and not isinstance(item, str)]
                if not uploads:
                    raise ApiError(400, "no_files", "send one or more files in the multipart field `files`")
                return await run_in_threadpool(_ingest_uploads, st, who.tenant, uploads)
            finally:
                await form.close()
        if kind == "application/json":
            try:
                body = PathsRequest.model_validate_json(await request.body())
            except ValueError as exc:
                errors = getattr(exc, "errors", lambda: [])()
                raise RequestValidationError(errors or [{"loc": ("body",), "msg": "invalid JSON"}]) from None
            return await run_in_threadpool(_ingest_paths, st, who.tenant, body.paths)
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data (field `files`) or application/json "
                                                      '({"paths": [...]})')

    @app.get("/v1/documents", response_model=DocumentList, tags=["documents"], summary="The tenant's documents",
             responses=ERROR_RESPONSES)
    def list_documents(who: Principal = Depends(principal), st: ApiState = Depends(ready_state)) -> dict[str, Any]:
        return {"documents": [_document_json(d) for d in st.runtime.index.documents(who.tenant)]}

    @app.get("/v1/documents/{doc_id}", response_model=DocumentOut, tags=["documents"], summary="One document",
             responses=ERROR_RESPONSES)
    def get_document(doc_id: str, who: Principal = Depends(principal),
                     st: ApiState = Depends(ready_state)) -> dict[str, Any]:
        if not _CHUNK_ID.match(doc_id):  # ids are 32 hex digits; anything else names nothing
            raise not_found("document")
        try:
            return _document_json(st.runtime.index.document(doc_id, who.tenant))
        except NotFoundError:
            raise not_found("document") from None

    @app.delete("/v1/documents/{doc_id}", response_model=Deleted, tags=["documents"],
                summary="Delete a document: its chunks, record, unreferenced images and uploaded file",
                responses=ERROR_RESPONSES)
    def delete_document(doc_id: str, who: Principal = Depends(principal),
                        st: ApiState = Depends(ready_state)) -> dict[str, Any]:
        if not _CHUNK_ID.match(doc_id):
            raise not_found("document")
        with st.write_lock:
            try:
                record = st.runtime.index.document(doc_id, who.tenant)
            except NotFoundError:
                raise not_found("document") from None
            st.runtime.ingestor.delete([record.doc_id], who.tenant)
            _confirm_deleted(st, record.doc_id)
            folder = st.tenant_dir(who.tenant).resolve()
            source = Path(record.source)
            if source.parent == folder and source.is_file():
                source.unlink()
        st.metrics.ingested.labels("deleted").inc()
        return {"deleted": record.doc_id}

    # -- search ----------------------------------------------------------------------------------------------
    @app.post("/v1/search", response_model=GroundingOut, tags=["retrieval"],
              summary="The passages and reference images that ground a prompt", responses=ERROR_RESPONSES)
    def search(body: SearchRequest, who: Principal = Depends(principal),
               st: ApiState = Depends(ready_state)) -> dict[str, Any]:
        from retrieval.retriever import Query, Retriever

        _check_text(st, body.text, "query")
        _check_k(st, k_text=body.k_text, k_image=body.k_image)
        image = _decode_image(st, body.image) if body.image else None
        grounding = Retriever(st.runtime).retrieve(Query(text=body.text or None, image=image, k_text=body.k_text,
                                                         k_image=body.k_image, filter=body.filter, tenant=who.tenant,
                                                         mode=body.mode))
        st.metrics.searches.labels(str(grounding.grounded).lower()).inc()
        return grounding_json(grounding, lambda hit: f"/v1/images/{hit.chunk.id}")

    # -- generate --------------------------------------------------------------------------------------------
    @app.post("/v1/generate", response_model=GeneratedOut, tags=["generation"],
              summary="A grounded answer with citations (and images when asked); `stream: true` for SSE",
              responses=ERROR_RESPONSES | {
                  200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}},
                  429: {"model": ERROR_RESPONSES[400]["model"], "description": "Generation queue full (Retry-After)"}})
    async def generate(body: GenerateRequest, request: Request, who: Principal = Depends(principal),
                       st: ApiState = Depends(ready_state)) -> Any:
        _check_text(st, body.prompt, "prompt")
        _check_k(st, k_text=body.k_text, k_image=body.k_image)
        if body.max_new_tokens is not None and body.max_new_tokens > st.api.max_new_tokens:
            raise ApiError(400, "max_new_tokens_too_large", f"max_new_tokens is {body.max_new_tokens}; the limit is "
                                                            f"{st.api.max_new_tokens} (api.max_new_tokens)")
        if body.stop and any(len(s) > 100 or not s for s in body.stop):
            raise ApiError(400, "bad_input", "each stop string must hold 1 to 100 characters")
        await st.gate.acquire()
        try:
            stream = await run_in_threadpool(_start_generation, st, who.tenant, body)
        except BaseException:
            st.gate.release()
            st.metrics.generations.labels("error").inc()
            raise
        if not body.stream:
            try:
                answer = await run_in_threadpool(lambda: _with_images(st, body, stream.result))
            except BaseException:
                st.metrics.generations.labels("error").inc()
                raise
            finally:
                await run_in_threadpool(stream.close)
                st.gate.release()
            return _finish(st, who.tenant, answer)
        return _GenerationResponse(_StreamedGeneration(st, who.tenant, stream, body))

    # -- images ----------------------------------------------------------------------------------------------
    @app.get("/v1/images/{image_id}", tags=["images"], summary="A reference image (by its chunk id) or a generated "
             "image (gen-...)", responses=ERROR_RESPONSES | {200: {"content": {"image/*": {"schema": {
                 "type": "string", "format": "binary"}}}}})
    def image(image_id: str, who: Principal = Depends(principal), st: ApiState = Depends(ready_state)) -> Response:
        data, media = st.image_bytes(image_id, who.tenant)
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600",
                                                         "X-Content-Type-Options": "nosniff"})

    # -- evals -----------------------------------------------------------------------------------------------
    @app.post("/v1/evals", response_model=EvalJobOut, status_code=202, tags=["evals"],
              summary="Start an evaluation run in the background", responses=ERROR_RESPONSES)
    def start_eval(body: EvalRequest, who: Principal = Depends(principal),
                   st: ApiState = Depends(ready_state)) -> dict[str, Any]:
        if st.api.server_root is None:
            raise ApiError(403, "server_paths_disabled", "evaluation sets are read from the server: set "
                                                         "api.server_root to the folder that holds them")
        root = Path(st.api.server_root).expanduser()
        dataset = body.dataset if body.dataset in ("halueval", "tuxpaint") else str(inside(root, Path(body.dataset)))
        corpus = inside(root, Path(body.corpus)) if body.corpus else None
        limit = body.limit or st.api.max_eval_records
        if limit > st.api.max_eval_records:
            raise ApiError(400, "limit_too_large", f"limit is {limit}; the limit is {st.api.max_eval_records} "
                                                   "(api.max_eval_records)")
        job = st.jobs.submit(who.tenant, body.dataset, {
            "dataset": dataset, "corpus": corpus, "limit": limit, "retrieval_only": body.retrieval_only,
            "max_new_tokens": min(body.max_new_tokens, st.api.max_new_tokens)})
        return job.to_json()

    @app.get("/v1/evals", response_model=EvalJobList, tags=["evals"], summary="The tenant's evaluation jobs",
             responses=ERROR_RESPONSES)
    def list_evals(who: Principal = Depends(principal), st: ApiState = Depends(ready_state)) -> dict[str, Any]:
        return {"jobs": [j.to_json() for j in st.jobs.list(who.tenant)]}

    @app.get("/v1/evals/{job_id}", response_model=EvalJobOut, tags=["evals"],
             summary="An evaluation job: status, summary, and the report when done", responses=ERROR_RESPONSES)
    def get_eval(job_id: str, who: Principal = Depends(principal), st: ApiState = Depends(ready_state)) -> Any:
        job = st.jobs.get(job_id, who.tenant)
        if job is None:
            raise not_found("evaluation job")
        return job.to_json(with_report=True)

    @app.get("/v1/evals/{job_id}/files/{name}", tags=["evals"], summary="A file of an evaluation report",
             responses=ERROR_RESPONSES | {200: {"content": {"application/octet-stream": {"schema": {
                 "type": "string", "format": "binary"}}}}})
    def eval_file(job_id: str, name: str, who: Principal = Depends(principal),
                  st: ApiState = Depends(ready_state)) -> Response:
        job = st.jobs.get(job_id, who.tenant)
        if job is None or name not in job.files():  # only names listed from the job's own folder
            raise not_found("evaluation file")
        return FileResponse(job.folder / name, headers={"X-Content-Type-Options": "nosniff"})

    # -- playground ------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def playground() -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# -- work done on worker threads ------------------------------------------------------------------------------------
def _report_json(st: ApiState, report: Any, named: list[tuple[str, Path]], tenant: str) -> dict[str, Any]:
    from mmrag.records import to_dict

    data = to_dict(report)
    for outcome in ("added", "updated", "unchanged", "deleted"):
        if data[outcome]:
            st.metrics.ingested.labels(outcome).inc(data[outcome])
    if data["failed"]:
        st.metrics.ingested.labels("failed").inc(len(data["failed"]))
    for modality, count in data["chunks"].items():
        if count:
            st.metrics.ingested_chunks.labels(modality).inc(count)
    failed = {f["source"] for f in data["failed"]}
    data["documents"] = [{"name": name, "doc_id": Document.make_id(str(path), tenant)} for name, path in named
                         if str(path) not in failed]  # named: what was given and went in
    return data


def _ingest_uploads(st: ApiState, tenant: str, uploads: list[Any]) -> dict[str, Any]:
    from mmrag.records import Failure, IngestReport

    folder = st.tenant_dir(tenant)
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    limit = st.api.max_upload_bytes
    rejected: list[Failure] = []
    stored: list[tuple[str, Path]] = []
    fresh: set[Path] = set()  # files this request created (removed again when their ingest fails)
    with st.write_lock:
        for upload in uploads:
            raw = upload.filename
            try:
                name = safe_upload_name(raw)
            except ApiError as exc:
                rejected.append(Failure(str(raw or "")[:200], exc.message))
                continue
            if any(name == seen for seen, _ in stored):
                rejected.append(Failure(name, "the same file name appears twice in this upload"))
                continue
            target = (folder / name).resolve()
            if target.parent != folder:  # belt and braces: the name is a single plain component already
                rejected.append(Failure(name, "file name leaves the upload folder"))
                continue
            tmp = folder / f".upload-{uuid.uuid4().hex}.tmp"
            size = 0
            try:
                with tmp.open("wb") as out:
                    upload.file.seek(0)
                    while chunk := upload.file.read(_COPY_STEP):
                        size += len(chunk)
                        if size > limit:
                            break
                        out.write(chunk)
                if size > limit:
                    tmp.unlink(missing_ok=True)
                    rejected.append(Failure(name, f"file is above the upload limit of {limit:,} bytes "
                                                  "(api.max_upload_bytes)"))
                    continue
                if not target.exists():
                    fresh.add(target)
                os.replace(tmp, target)
                stored.append((name, target))
            finally:
                tmp.unlink(missing_ok=True)
        try:
            report = st.runtime.ingestor.ingest([p for _, p in stored], tenant=tenant) if stored else IngestReport()
            _confirm_uploads(st, tenant, [p for _, p in stored], {f.source for f in report.failed})
        except BaseException:  # e.g. Milvus down (503): the client retries; keep no file it was not told about
            for path in fresh:
                path.unlink(missing_ok=True)
            raise
        failed_sources = {f.source for f in report.failed}
        for _, path in stored:
            if path in fresh and str(path) in failed_sources:
                path.unlink(missing_ok=True)  # never ingested: keep no stray file
    ingested = [(name, path) for name, path in stored if str(path) not in failed_sources]
    # Failures are named as the client named the files, never by their server paths.
    report = type(report)(added=report.added, updated=report.updated, unchanged=report.unchanged,
                          deleted=report.deleted, failed=tuple(rejected) + tuple(
                              Failure(_display_name(f.source, folder), f.reason) for f in report.failed),
                          chunks=report.chunks)
    return _report_json(st, report, ingested, tenant)


def _confirm_uploads(st: ApiState, tenant: str, paths: list[Path], failed: set[str]) -> None:
    """Read back every upload about to be acknowledged: its record holds the file's version and exactly that
    version's chunks are stored. A write the store acknowledged and then did not keep (milvus-lite server: see
    ``MilvusIndex._reopen_alone``), or a retried upload whose first attempt left a record without its chunks (the
    ingest then finds it unchanged), is written again from the stored file; StoreError (503, the client retries)
    when it still is not there. Costs one point read and two counts per document."""
    index = st.runtime.index
    for path in paths:
        if str(path) in failed:
            continue
        doc_id = Document.make_id(str(path), tenant)
        version = hashlib.sha256(path.read_bytes()).hexdigest()  # Document.version: the sha256 of the bytes
        problem = index.stored_state(doc_id, version)
        if problem is None:
            continue
        logger.warning("upload %s is not stored as written (%s): writing it again", path.name, problem)
        st.metrics.store_repairs.labels("upload").inc()
        index.delete_document(doc_id)  # the record too: the ingest then redoes the file instead of skipping it
        report = st.runtime.ingestor.ingest([path], tenant=tenant)
        problem = "; ".join(f.reason for f in report.failed) or index.stored_state(doc_id, version)
        if problem:
            raise StoreError(f"Milvus did not keep the upload {path.name!r} ({problem}); try again")


def _confirm_deleted(st: ApiState, doc_id: str) -> None:
    """Read back an acknowledged delete: neither the record nor a chunk of the document is left (else delete
    again, then StoreError)."""
    index = st.runtime.index
    problem = index.stored_state(doc_id, None)
    if problem is None:
        return
    logger.warning("deleted document %s is still stored (%s): deleting it again", doc_id, problem)
    st.metrics.store_repairs.labels("delete").inc()
    st.runtime.ingestor.blobs.mark_pending_gc()  # the next ingest or delete sweeps its images
    index.delete_document(doc_id)
    index.flush()
    problem = index.stored_state(doc_id, None)
    if problem:
        raise StoreError(f"Milvus did not delete document {doc_id} ({problem}); try again")


def _display_name(source: str, folder: Path) -> str:
    path = Path(source)
    return path.name if path.parent == folder else source


def _ingest_paths(st: ApiState, tenant: str, paths: list[str]) -> dict[str, Any]:
    if st.api.server_root is None:
        raise ApiError(403, "server_paths_disabled", "ingesting server-side paths is off: set api.server_root to "
                                                     "the folder the API may read, or upload the files")
    root = Path(st.api.server_root).expanduser()
    resolved = [inside(root, Path(p)) for p in paths]
    with st.write_lock:
        report = st.runtime.ingestor.ingest(resolved, tenant=tenant)
    named = [(p.name, p) for p in resolved if p.is_file()]
    return _report_json(st, report, named, tenant)


def _start_generation(st: ApiState, tenant: str, body: GenerateRequest) -> Any:
    from retrieval.retriever import Query

    generator = st.generator
    params = generator.params(max_new_tokens=body.max_new_tokens, temperature=body.temperature, seed=body.seed,
                              stop=body.stop)
    query = Query(text=body.prompt, k_text=body.k_text, k_image=body.k_image, filter=body.filter, tenant=tenant)
    return generator.stream(body.prompt, query=query, params=params)


def _with_images(st: ApiState, body: GenerateRequest, answer: Any) -> Any:
    """The answer with reference-guided images when asked for (``GroundedGenerator.images``): written to a staging
    folder, published by ``_finish``. An image failure leaves the text intact and says why in ``image_error``."""
    if not body.images:
        return answer
    from generation.image import ImageRequest

    staging = Path(st.settings.data_dir).expanduser() / "api-staging" / uuid.uuid4().hex
    outcome = st.generator.images(body.prompt, answer.grounding, ImageRequest(seed=body.seed, out_dir=staging))
    return answer.with_images(outcome)


def _finish(st: ApiState, tenant: str, answer: Any) -> dict[str, Any]:
    st.metrics.generations.labels("abstained" if answer.abstained else "answered").inc()
    st.metrics.generated_tokens.inc(int(answer.usage.get("completion_tokens") or 0))
    return st.publish_images(answer.to_json(), tenant)


class _StreamedGeneration:
    """One streamed answer: ``events()`` gives token events as the model writes, then ``done`` with the full
    answer (or ``error``). ``cleanup()`` closes the generation (freeing the model) and releases its slot, once,
    however the response ends: finished, failed, or the client gone (even before the first event)."""

    def __init__(self, st: ApiState, tenant: str, stream: Any, body: GenerateRequest) -> None:
        self.st = st
        self.body = body
        self.tenant = tenant
        self.stream = stream
        self.pieces = iter(stream)
        self.recorded = False
        self._done = False
        self._lock = threading.Lock()

    async def events(self) -> AsyncIterator[bytes]:
        st = self.st
        sentinel = object()
        try:
            while True:
                piece = await anyio.to_thread.run_sync(next, self.pieces, sentinel)
                if piece is sentinel:
                    break
                yield _sse("token", {"text": piece})
            answer = await anyio.to_thread.run_sync(_with_images, st, self.body, self.stream.result)
            self.recorded = True
            yield _sse("done", _finish(st, self.tenant, answer))
        except MmragError as exc:
            _, code = status_of(exc)
            self.recorded = True
            st.metrics.generations.labels("error").inc()
            yield _sse("error", {"code": code, "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band, log the trace
            logger.exception("generation stream failed")
            self.recorded = True
            st.metrics.generations.labels("error").inc()
            yield _sse("error", {"code": "internal_error", "message": f"generation failed: {type(exc).__name__}"})
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        if not self.recorded:  # the client went away mid-answer
            self.st.metrics.generations.labels("cancelled").inc()
        with contextlib.suppress(Exception):
            self.pieces.close()
        with contextlib.suppress(Exception):
            self.stream.close()
        self.st.gate.release()


class _GenerationResponse(StreamingResponse):
    def __init__(self, generation: _StreamedGeneration) -> None:
        super().__init__(generation.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cleanup()


class _CatchAllMiddleware:
    """The last line of defence: an unexpected exception becomes a 500 ``internal_error`` JSON body (the trace goes
    to the log, never to the client)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # noqa: BLE001
            ref = uuid.uuid4().hex[:12]
            logger.exception("internal error %s on %s %s", ref, scope.get("method"), scope.get("path"))
            if started:
                raise
            body = json.dumps({"code": "internal_error", "message": f"internal error (reference {ref}); the server "
                                                                    "log has the details"}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (``mmrag serve --workers N``): settings from the environment."""
    from mmrag.config import load_settings

    return create_app(load_settings())


__all__ = ["create_app", "create_app_from_env", "ApiState"]
