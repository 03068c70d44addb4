"""Limits of the HTTP API: request size, upload names, and the bounded queue of concurrent generations."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import time
import unicodedata
from collections import deque
from pathlib import Path, PurePosixPath
from typing import Any

from mmrag.api.errors import ApiError

MAX_NAME_CHARS = 200


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answers 413 ``request_too_large`` for a body above ``limit`` bytes, by its Content-Length or, for a chunked
    body, as soon as the bytes read pass the limit (the rest is never buffered)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        seen = 0
        started = False
        rejected = False

        async def counting_receive() -> dict:
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Answer now: whatever the app makes of the aborted body (some frameworks turn any read error
                    # into a 400) is dropped by guarded_send.
                    if not started and not rejected:
                        rejected = True
                        await self._reject(send)
                    raise _TooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"code": "request_too_large",
                           "message": f"the request body is above the limit of {self.limit:,} bytes "
                                      "(api.max_request_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def safe_upload_name(raw: str | None) -> str:
    """The file name an upload is stored under: the last path component only, no control characters, no leading
    dot. Anything else (empty, ``..``, NUL) is refused, never repaired into something the client did not send."""
    if not raw:
        raise ApiError(400, "bad_filename", "every uploaded file needs a file name")
    name = unicodedata.normalize("NFC", raw).replace("\\", "/")
    name = PurePosixPath(name).name
    if not name or name in (".", "..") or name.startswith(".") or any(unicodedata.category(c) == "Cc" for c in name):
        raise ApiError(400, "bad_filename", f"unusable file name {raw[:100]!r}: give a plain name such as report.pdf "
                                            "(no leading dot, no control characters)")
    if len(name) > MAX_NAME_CHARS:
        raise ApiError(400, "bad_filename", f"file name is {len(name)} characters; the limit is {MAX_NAME_CHARS}")
    return name


def tenant_folder(tenant: str) -> str:
    """A tenant's folder name: readable, and unique per tenant even where the readable part collides."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", tenant)[:40].lstrip(".") or "tenant"
    return f"{slug}-{hashlib.sha256(tenant.encode()).hexdigest()[:12]}"


def inside(root: Path, candidate: Path) -> Path:
    """``candidate`` resolved (symlinks followed), provided it lies inside ``root``; else a 403 that does not say
    whether it exists."""
    base = root.resolve()
    try:
        resolved = (base / candidate).resolve() if not candidate.is_absolute() else candidate.resolve()
    except (OSError, ValueError):  # a NUL byte, a name too long, a symlink loop
        raise ApiError(400, "bad_path", f"unusable path {str(candidate)[:200]!r}") from None
    if resolved != base and base not in resolved.parents:
        raise ApiError(403, "path_outside_root", f"{str(candidate)[:200]!r} is outside the server root the API "
                                                 "may read (api.server_root)")
    return resolved


class GenerationGate:
    """At most ``concurrent`` generations run; up to ``queued`` more wait, first come first served, for at most
    ``timeout_s``; beyond that a request gets 429 with Retry-After at once.

    Waiting holds no thread (the event loop polls every ``poll_s``), so a full queue never starves the thread pool
    that searches and uploads run on; a slot may be released from any thread."""

    poll_s = 0.02

    def __init__(self, concurrent: int, queued: int, timeout_s: float, retry_after_s: int) -> None:
        self.concurrent = concurrent
        self.capacity = concurrent + queued
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self.running = 0
        self.admitted = 0  # running + waiting
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()

    def _busy(self, why: str) -> ApiError:
        return ApiError(429, "too_many_generations", f"{why}; retry after {self.retry_after_s} s",
                        headers={"Retry-After": str(self.retry_after_s)})

    def try_acquire(self) -> bool:
        """Take a free slot now if no one is waiting for one; never waits."""
        with self._lock:
            if self._queue or self.running >= self.concurrent:
                return False
            self.running += 1
            self.admitted += 1
            return True

    async def acquire(self) -> None:
        """Wait for a slot in arrival order, or raise 429 (queue full, or no slot within ``timeout_s``)."""
        import anyio

        with self._lock:
            if self.admitted >= self.capacity:
                raise self._busy(f"{self.concurrent} generation(s) running and the queue is full")
            self.admitted += 1
            ticket = next(self._tickets)
            self._queue.append(ticket)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                with self._lock:
                    if self._queue[0] == ticket and self.running < self.concurrent:
                        self._queue.popleft()
                        self.running += 1
                        return
                if time.monotonic() >= deadline:
                    raise self._busy(f"no generation slot freed within {self.timeout_s:g} s")
                await anyio.sleep(self.poll_s)
        except BaseException:  # timed out, or the request was cancelled while waiting
            with self._lock:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self.admitted -= 1
            raise

    def release(self) -> None:
        with self._lock:
            self.running -= 1
            self.admitted -= 1
