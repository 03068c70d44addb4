"""Documents parsed in the background, beside the other sources' preparing and embedding: the stored result does
not depend on it (same rows as ingesting each file on its own), and a parse worker started ahead of time is the one
that parses the first document."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from ingest.elements import ParseOptions
from ingest.isolation import ParseLimits, ParserPool


def _corpus(root: Path) -> list[Path]:
    """Documents (Markdown with a picture, HTML) interleaved in name order with text files and images."""
    root.mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "b-car.png")
    Image.new("RGB", (40, 40), (20, 40, 220)).save(root / "d-boat.png")
    (root / "a-cars.md").write_text("# Cars\n\nThe Ford Mustang was introduced in April 1964.\n\n"
                                    "![A red sports car seen from the side](b-car.png)\n\nIt sold well.\n")
    (root / "c-notes.txt").write_text("Chrome bumpers were triple-plated with copper, nickel and chromium.\n")
    (root / "e-harbour.html").write_text("<html><body><h1>Harbour</h1><p>Boats leave at dawn.</p>"
                                         "<img src='d-boat.png' alt='A blue boat'></body></html>")
    for i in range(12):
        (root / f"f-passage-{i:02d}.txt").write_text(f"Passage {i} tells of ship number {i} and its crew.\n")
    return sorted(root.iterdir())


def _rows(runtime) -> dict[str, dict]:
    fields = ["id", "doc_id", "modality", "text", "source", "page", "position", "blob", "version", "meta",
              "text_vector", "clip_vector"]
    return {r["id"]: r for r in runtime.index.chunk_rows("", fields)}


def test_background_document_parsing_stores_what_file_by_file_ingests_store(make_runtime, tmp_path):
    files = _corpus(tmp_path / "kb")
    together = make_runtime(data_dir=tmp_path / "together")
    report = together.ingestor.ingest([tmp_path / "kb"])
    assert report.added == len(files) and not report.failed
    stages = together.ingestor.timings
    assert {"knowledge_base", "clip_image", "milvus_write", "total"} <= set(stages)
    assert "text_encoders" in stages or {"text_embedder", "clip_text"} <= set(stages)  # two cores or one
    assert stages["total"] >= max(v for k, v in stages.items() if k != "total")

    alone = make_runtime(data_dir=tmp_path / "alone")
    for path in reversed(files):  # one file per ingest, documents first: no background parsing, other batches
        assert alone.ingestor.ingest([path]).added == 1

    mine, theirs = _rows(together), _rows(alone)
    assert set(mine) == set(theirs)  # chunk ids derive from document, position and content
    modalities = [r["modality"] for r in mine.values()]
    assert modalities.count("image") == 4  # two picture files, and each also inside a document
    for chunk_id, row in mine.items():
        other = theirs[chunk_id]
        for key in ("doc_id", "modality", "text", "source", "page", "position", "blob", "version", "meta"):
            assert row[key] == other[key], (chunk_id, key)
        for key in ("text_vector", "clip_vector"):  # batched differently: equal within float noise
            a, b = np.asarray(row[key], dtype=np.float32), np.asarray(other[key], dtype=np.float32)
            assert float(a @ b) > 0.999, (chunk_id, key)
    # Both text encoders ran in slices shared by two threads: their vectors are those of the models themselves.
    texts = {i: r for i, r in mine.items() if r["modality"] != "image"}
    expected = together.models.clip.encode_texts([r["text"] for r in texts.values()])
    for row, vector in zip(texts.values(), expected):
        assert float(np.asarray(row["clip_vector"], dtype=np.float32) @ vector) > 0.999, row["source"]
    lanes = together.ingestor.lane_timings
    if "text_encoders" in stages:  # the main thread and the one beside it shared both models' slices
        assert lanes["clip_text"] > 0 and lanes["text_embedder"] > 0
    minilm = together.models.text_embedder.encode([r["text"] for r in mine.values()])
    for row, vector in zip(mine.values(), minilm):
        assert float(np.asarray(row["text_vector"], dtype=np.float32) @ vector) > 0.999, row["source"]
    assert together.ingestor.ingest([tmp_path / "kb"]).unchanged == len(files)


def test_prestarted_worker_parses_the_first_document(tmp_path):
    pool = ParserPool(1)
    try:
        pool.prestart()
        deadline = time.monotonic() + 300
        while not pool.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        ready = pool.pids()
        assert len(ready) == 1
        elements = pool.parse(Path("doc.md"), b"# Title\n\nA paragraph about ships.\n", ParseOptions(), ParseLimits())
        assert any("ships" in (e.text or "") for e in elements)
        assert pool.started == 1 and pool.pids() == ready  # no second start: the first document found it ready
        pool.prestart()  # the pool is full: starts nothing
        time.sleep(0.5)
        assert pool.started == 1
    finally:
        pool.close()


def test_shared_encoding_keeps_input_order_and_lets_the_idle_thread_take_the_other_models_slices():
    import threading

    from ingest.pipeline import _SharedEncoding

    started, stolen = threading.Event(), threading.Event()
    calls: list[tuple[str, str, int]] = []

    def encoder(name: str):
        def encode(texts: list[str]) -> np.ndarray:
            thread = threading.current_thread().name
            calls.append((name, thread, len(texts)))
            if name == "fast":
                started.wait(10)  # the beside thread's own slice lasts until the main thread has begun its own
            elif thread == "beside":
                stolen.set()
            else:
                started.set()
                stolen.wait(10)  # the main thread's slice lasts until the beside thread has taken one of its model
            return np.array([[len(t), ord(t[0]), 1.0 if name == "slow" else 2.0] for t in texts], dtype=np.float32)
        return encode

    slow_texts = [f"{chr(97 + i % 26)}{'x' * (i % 7)}" for i in range(40)] + ["repeat", "repeat"]
    fast_texts = ["one", "three", "one"]
    shared = _SharedEncoding([(encoder("slow"), slow_texts, 3), (encoder("fast"), fast_texts, 3)], step=4)
    beside = threading.Thread(target=shared.work, args=(1,), name="beside")
    beside.start()
    shared.work(0)
    beside.join()
    assert stolen.is_set()
    # The beside thread did its own model's one slice, then took the other model's slices.
    assert [c for c in calls if c[0] == "fast"] == [("fast", "beside", 2)]  # a repeated text is encoded once
    assert {thread for name, thread, _ in calls if name == "slow"} == {"MainThread", "beside"}
    assert sum(n for name, _, n in calls if name == "slow") == 41  # every distinct text once
    for job, texts, tag in ((0, slow_texts, 1.0), (1, fast_texts, 2.0)):
        vectors = shared.vectors(job)
        assert vectors.tolist() == [[len(t), ord(t[0]), tag] for t in texts]
    assert shared.seconds[0] > 0 and shared.seconds[1] > 0
