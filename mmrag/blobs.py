"""Content-addressed blob store for image bytes: a local folder by default, any fsspec URL (s3:// for MinIO).

A blob's key is ``ab/<sha256>.<ext>``: the same bytes always land on the same key, so re-ingesting writes nothing
new and two documents sharing an image share one blob. Chunks store the key; ``url(key)`` gives where it lives.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

from mmrag.errors import NotFoundError, StoreError

logger = logging.getLogger(__name__)

_PENDING_GC = "_state/pending-gc"


class BlobStore:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open blob store {url!r}: {exc}") from exc
        self.url = url
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    @staticmethod
    def key_for(data: bytes, ext: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        ext = ext.lower().lstrip(".") or "bin"
        return f"{digest[:2]}/{digest}.{ext}"

    def _path(self, key: str) -> str:
        if ".." in key.split("/") or key.startswith("/"):
            raise NotFoundError(f"invalid blob key {key!r}")
        return f"{self.root.rstrip('/')}/{key}"

    def url_of(self, key: str) -> str:
        """Where a blob lives, as a path (local store) or a URL (remote store)."""
        path = self._path(key)
        return path if self.local else self.fs.unstrip_protocol(path)

    def put(self, data: bytes, ext: str) -> str:
        """Store bytes and return their key; a no-op when the same bytes are already stored."""
        key = self.key_for(data, ext)
        path = self._path(key)
        try:
            if self.fs.exists(path):
                self._touch(path, data)  # in use again: a concurrent sweep's grace period starts over
                return key
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)  # atomic: a reader never sees half a blob
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write blob {key}: {exc}") from exc
        return key

    def _touch(self, path: str, data: bytes) -> None:
        if self.local:
            os.utime(path)
        else:
            self.fs.pipe_file(path, data)  # object stores have no cheap touch; same bytes, same key

    def _age_s(self, key: str) -> float:
        import time

        info = self.fs.info(self._path(key))
        modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
        if hasattr(modified, "timestamp"):
            modified = modified.timestamp()
        return time.time() - float(modified) if modified else float("inf")

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {key} does not exist") from exc
        except OSError as exc:
            raise StoreError(f"cannot read blob {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def keys(self) -> Iterator[str]:
        """Every stored blob key (temporary files and the store's own state excluded)."""
        root = self.root.rstrip("/")
        try:
            paths = self.fs.find(root)
        except FileNotFoundError:
            return
        for path in paths:
            key = path[len(root) + 1:] if path.startswith(root) else path
            if key.startswith("_state/") or key.endswith(".tmp"):
                continue
            yield key

    # A marker that says "a run changed blobs and has not swept orphans yet": set before a run writes or
    # deletes, cleared after its final sweep, so a killed run's successor knows to sweep.
    def mark_pending_gc(self) -> None:
        path = self._path(_PENDING_GC)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, b"1")

    def pending_gc(self) -> bool:
        return self.fs.exists(self._path(_PENDING_GC))

    def clear_pending_gc(self) -> None:
        self.delete(_PENDING_GC)

    def sweep(self, referenced: set[str], grace_s: float = 0.0) -> int:
        """Delete blobs no chunk references and nothing wrote or re-used in the last ``grace_s`` seconds;
        returns how many went."""
        removed = 0
        for key in list(self.keys()):
            if key not in referenced and (grace_s <= 0 or self._age_s(key) >= grace_s):
                self.delete(key)
                removed += 1
        if removed:
            logger.info("removed %d orphaned blob(s)", removed)
        return removed
