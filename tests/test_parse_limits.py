"""Per-file limits on document parsing (ingest/isolation.py): a file whose parse runs past
``ingest.parse_timeout_s`` or needs more than ``ingest.parse_memory_mb`` is refused with that reason while the
rest of its batch is ingested; a parse worker killed mid-batch loses nothing; the workers die with a SIGKILLed
ingest. The slow and huge inputs are real generated documents (a large HTML page), parsed by the real parsers in
real worker processes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hostilecorpus
from conftest import save_clip_folder
from ingest.isolation import shared_pool


def big_html(paragraphs: int) -> bytes:
    """A large, well-formed HTML page: its parse time and memory grow with ``paragraphs`` (about 0.15-0.4 ms and
    4 KB of parser memory each here)."""
    body = "".join(f"<p>Paragraph {i} tells how the quick brown fox jumped over the lazy dog number {i}.</p>\n"
                   for i in range(paragraphs))
    return f"<html><head><title>Big</title></head><body><h1>A big page</h1>{body}</body></html>".encode()


def small_batch(folder: Path) -> set[str]:
    """Ordinary files beside the hostile one: documents (parsed in workers), text and an image (in-process)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "b-notes.md").write_text("# Garden notes\n\nTomatoes need full sun and regular watering.\n")
    (folder / "c-page.html").write_text("<html><body><h1>Bicycles</h1><p>A bicycle has two wheels and pedals."
                                        "</p></body></html>")
    (folder / "d-plain.txt").write_text("Lighthouses guide ships along rocky coasts at night.\n")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buffer, format="PNG")
    (folder / "e-blue.png").write_bytes(buffer.getvalue())
    return {"b-notes.md", "c-page.html", "d-plain.txt", "e-blue.png"}


def names(paths) -> set[str]:
    return {Path(p).name for p in paths}


def test_a_file_past_the_time_limit_is_refused_and_the_batch_goes_on(tmp_path, make_runtime):
    kb = tmp_path / "kb"
    ordinary = small_batch(kb)
    (kb / "a-slow.html").write_bytes(big_html(150_000))  # tens of seconds of parsing
    runtime = make_runtime(ingest={"parse_timeout_s": 3})
    started = time.monotonic()
    report = runtime.ingestor.ingest([kb])
    elapsed = time.monotonic() - started
    failed = {Path(f.source).name: f.reason for f in report.failed}
    assert failed == {"a-slow.html": "parsing took longer than 3 s (ingest.parse_timeout_s)"}
    assert report.added == len(ordinary)
    assert names(d.source for d in runtime.index.documents()) == ordinary
    assert elapsed < 60, elapsed  # the slow parse was cut off, not waited for
    # The killed worker was replaced: the next ingest parses documents again.
    (kb / "a-slow.html").write_bytes(big_html(20))
    assert runtime.ingestor.ingest([kb]).added == 1


def test_a_file_past_the_memory_limit_is_refused_and_the_batch_goes_on(tmp_path, make_runtime):
    kb = tmp_path / "kb"
    ordinary = small_batch(kb)
    (kb / "a-huge.html").write_bytes(big_html(150_000))  # hundreds of MB of parser memory
    runtime = make_runtime(ingest={"parse_memory_mb": 64, "parse_timeout_s": 300})
    report = runtime.ingestor.ingest([kb])
    failed = {Path(f.source).name: f.reason for f in report.failed}
    assert list(failed) == ["a-huge.html"]
    assert "memory limit of 64 MB (ingest.parse_memory_mb)" in failed["a-huge.html"]
    assert report.added == len(ordinary)
    assert names(d.source for d in runtime.index.documents()) == ordinary


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_no_file(tmp_path, make_runtime):
    """One preparing thread, so the files go through one worker in order: the first (a slow page) is being parsed
    when its worker is SIGKILLed from outside; it is parsed again in a fresh worker, and so are the rest."""
    kb = tmp_path / "kb"
    ordinary = small_batch(kb)
    (kb / "a-slow.html").write_bytes(big_html(12_000))
    runtime = make_runtime(runtime={"torch_threads": 1}, ingest={"parse_timeout_s": 300})
    pool = shared_pool(1)
    started_before = pool.started
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("report", runtime.ingestor.ingest([kb])))
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        busy = pool.pids(busy=True)
        if busy:
            time.sleep(0.5)  # well inside the parse of the slow page
            os.kill(busy[0], signal.SIGKILL)
            killed = busy[0]
        time.sleep(0.05)
    thread.join(300)
    assert killed is not None, "no worker was seen busy"
    report = result["report"]
    assert report.failed == ()
    assert report.added == len(ordinary) + 1
    assert names(d.source for d in runtime.index.documents()) == ordinary | {"a-slow.html"}
    assert pool.started > started_before and killed not in pool.pids()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree = _children()
    out, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _running(pid: int) -> bool:
    return _state(pid) not in ("Z", "X", "gone")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_no_parse_worker_outlives_a_sigkilled_ingest(tmp_path, tiny_clip):
    kb = tmp_path / "kb"
    small_batch(kb)
    (kb / "a-slow.html").write_bytes(big_html(150_000))
    clip = save_clip_folder(tiny_clip, tmp_path / "tiny-clip")
    profile = hostilecorpus.write_profile(tmp_path, clip)
    env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(hostilecorpus.ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "mmrag.cli", "--profile", str(profile), "ingest", str(kb)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Wait for the forkserver and a worker forked from it (parsing the slow page by then).
        deadline = time.monotonic() + 300
        workers: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None and len(workers) < 2:
            workers = [pid for pid in _descendants(proc.pid) if "multiprocessing.forkserver" in _cmdline(pid)]
            time.sleep(0.2)
        assert proc.poll() is None and len(workers) >= 2, (proc.poll(), workers, _descendants(proc.pid))
        # Everything multiprocessing started for the ingest: the forkserver, its workers, the resource tracker.
        workers = [pid for pid in _descendants(proc.pid) if "multiprocessing" in _cmdline(pid)]
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_running(pid) for pid in workers):
            time.sleep(0.1)
        assert [(pid, _state(pid), _cmdline(pid)[:80]) for pid in workers if _running(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\x00", b" ").decode(errors="replace")
    except OSError:
        return ""
