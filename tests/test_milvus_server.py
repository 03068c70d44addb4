"""The server code path: the same index code against a Milvus gRPC server (``milvus-lite server`` on 127.0.0.1),
as docker compose's Milvus standalone would be reached through ``--milvus-uri``."""

from __future__ import annotations

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
