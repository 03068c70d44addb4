"""The server code path: the same index code against a Milvus gRPC server (``milvus-lite server`` on 127.0.0.1),
as docker compose's Milvus standalone would be reached through ``--milvus-uri``."""

from __future__ import annotations

import time
from pathlib import Path


def test_ingest_sync_and_delete_through_a_milvus_server(make_runtime, tmp_path, milvus_server):
    from PIL import Image

    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "a.txt").write_text("Milvus standalone keeps its data in MinIO and its metadata in etcd.")
    (kb / "b.md").write_text("# Deployment\n\nSeveral API workers share one Milvus server.\n")
    Image.new("RGB", (40, 40), (0, 128, 0)).save(kb / "green-square.png")
    runtime = make_runtime(milvus={"uri": milvus_server.uri})
    assert not runtime.index.embedded
    report = runtime.ingestor.ingest([kb])
    assert report.failed == () and report.added == 3
    assert not (tmp_path / "data" / "milvus.db").exists()  # nothing embedded was opened
    stats = runtime.index.stats()
    assert stats["milvus_uri"] == milvus_server.uri and stats["documents"] == 3
    assert stats["partition_key"] is True  # the server supports the tenant partition key
    assert runtime.ingestor.ingest([kb]).unchanged == 3
    (kb / "a.txt").unlink()
    assert runtime.ingestor.ingest([kb], sync=True).deleted == 1
    runtime.close()
    # A second client (another API worker, another process) sees the same knowledge base.
    other = make_runtime(milvus={"uri": milvus_server.uri})
    assert {Path(d.source).name for d in other.index.documents()} == {"b.md", "green-square.png"}
    assert other.index.count('modality == "image"') == 1


def test_creating_the_knowledge_base_runs_alone(make_runtime, tmp_path, milvus_server):
    """milvus-lite server caches a new collection only after create_collection has written its schema: a call naming
    it in between (a search while the first upload creates the knowledge base) opens a second copy from disk. So
    creation waits for the index's calls already in flight, and calls from other threads wait until it ends."""
    import threading
    import time

    runtime = make_runtime(milvus={"uri": milvus_server.uri})
    index = runtime.index
    log: list[tuple[str, float]] = []
    stop = threading.Event()

    def timed(fn, *args):  # a Milvus request through the index, with the time it was on the wire noted
        def request():
            started = time.monotonic()
            try:
                return fn(*args)
            finally:
                log.append(("call", started, time.monotonic()))

        return index._call(request)

    def keep_asking() -> None:  # another request thread: what a search does first
        while not stop.is_set():
            if timed(index.client.has_collection, index.chunks):
                timed(index.client.get_load_state, index.chunks)

    real_create = index._create

    def create(*args):  # the real creation, with its start and end noted
        started = time.monotonic()
        real_create(*args)
        log.append(("create", started, time.monotonic()))

    index._create = create
    askers = [threading.Thread(target=keep_asking) for _ in range(4)]
    for thread in askers:
        thread.start()
    try:
        time.sleep(0.2)
        kb = tmp_path / "kb"
        kb.mkdir()
        (kb / "a.txt").write_text("The first upload creates the knowledge base while searches arrive.")
        assert runtime.ingestor.ingest([kb]).added == 1
        time.sleep(0.2)
    finally:
        stop.set()
        for thread in askers:
            thread.join()
    (_, created_at, created_until), = [entry for entry in log if entry[0] == "create"]
    calls = [entry for entry in log if entry[0] == "call"]
    assert any(end <= created_at for _, _, end in calls) and any(start >= created_until for _, start, _ in calls)
    overlapping = [(start, end) for _, start, end in calls if start < created_until and end > created_at]
    assert not overlapping, f"{len(overlapping)} requests ran while the knowledge base was being created"
    assert runtime.index.count() == 1


def test_listing_a_hung_servers_documents_fails_within_the_timeout(make_runtime, tmp_path, milvus_server):
    """Every ingest and delete starts by listing documents through a query iterator: like every other call, it is
    bounded by milvus.timeout_s when the server takes the call and never answers (SIGSTOP), and works again once
    the server does."""
    import threading

    from mmrag.errors import StoreError

    runtime = make_runtime(milvus={"uri": milvus_server.uri, "index_type": "FLAT", "timeout_s": 2})
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "a.txt").write_text("The lighthouse keeper lit the lamp at dusk.\n")
    assert runtime.ingestor.ingest([kb]).added == 1
    outcome: list[object] = []

    def listing() -> None:
        try:
            outcome.append(runtime.index.documents())
        except StoreError as exc:
            outcome.append(exc)

    milvus_server.pause()
    try:
        started = time.monotonic()
        thread = threading.Thread(target=listing, daemon=True)
        thread.start()
        thread.join(30)
        took = time.monotonic() - started
    finally:
        milvus_server.resume()
    thread.join(60)
    assert outcome and isinstance(outcome[0], StoreError), outcome
    assert took < 30
    assert [d.source for d in runtime.index.documents()] == [str(kb / "a.txt")]
