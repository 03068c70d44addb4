"""One process's shared resources: settings, the loaded models, the Milvus index and the blob store.

The CLI, the HTTP API and the eval runner each build one ``Runtime`` and pass it down; everything in it is created
lazily, on first use, and closed once.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from mmrag.config import Settings
from mmrag.models import ModelSet

if TYPE_CHECKING:
    from ingest.pipeline import Ingestor
    from mmrag.blobs import BlobStore
    from mmrag.index import MilvusIndex


class Runtime:
    def __init__(self, settings: Settings, models: ModelSet | None = None) -> None:
        self.settings = settings
        self.models = models or ModelSet(settings)

    @functools.cached_property
    def index(self) -> "MilvusIndex":
        from mmrag.index import MilvusIndex

        return MilvusIndex(self.settings)

    @functools.cached_property
    def blobs(self) -> "BlobStore":
        from mmrag.blobs import BlobStore

        return BlobStore(self.settings.blob_url, self.settings.blobs.storage_options)

    @functools.cached_property
    def ingestor(self) -> "Ingestor":
        from ingest.pipeline import Ingestor

        return Ingestor(self.settings, self.models, self.index, self.blobs)

    def close(self) -> None:
        if "index" in self.__dict__:
            self.index.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
