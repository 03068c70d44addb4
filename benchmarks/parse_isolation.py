"""What parsing documents in worker processes (ingest/isolation.py) costs, side by side in one run. Prints JSON.

- start-up: the forkserver with the parser modules plus the first worker, a second worker (a fork), and a
  replacement after a worker is killed;
- per file, over the documents of ../shared/data/docs (PDF, DOCX, PPTX, HTML): ``parse_file`` in this process
  against the same call in a warm worker (sending the bytes, pickling the elements back), interleaved, median of
  the rounds;
- a whole ingest of ../shared/data/docs (MiniLM, ViT-B-32 with random weights: the real cost) with documents parsed
  in workers (the product) against the same ingest with them parsed in this process's threads, interleaved;
- the memory of an idle worker (RSS, and PSS: pages shared with the forkserver and the other workers split).

    python benchmarks/parse_isolation.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)

DOCUMENT_SUFFIXES = (".pdf", ".docx", ".pptx", ".html", ".htm", ".md")


def _memory(pid: int) -> dict[str, float]:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith(("Rss:", "Pss:")):
                    out[line.split(":")[0].lower() + "_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    _common.offline_env()

    import ingest.pipeline as pipeline
    from ingest.elements import ParseOptions
    from ingest.isolation import ISOLATED_KINDS, ParseLimits, ParserPool
    from ingest.parsers import parse_file
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    docs = _common.shared_data() / "docs"
    files = sorted(p for p in docs.rglob("*") if p.suffix.lower() in DOCUMENT_SUFFIXES)
    options = ParseOptions()
    limits = ParseLimits()

    # 1. Start-up.
    pool = ParserPool(2)
    started = time.perf_counter()
    first = pool._checkout()
    startup = {"forkserver_and_first_worker_s": round(time.perf_counter() - started, 2)}
    started = time.perf_counter()
    second = pool._checkout()
    startup["second_worker_s"] = round(time.perf_counter() - started, 3)
    os.kill(first.pid, signal.SIGKILL)
    pool._checkin(first, keep=False)
    started = time.perf_counter()
    replacement = pool._checkout()  # the second is still checked out: this one is new
    startup["replacement_worker_s"] = round(time.perf_counter() - started, 3)
    pool._checkin(second, keep=True)
    pool._checkin(replacement, keep=True)
    idle_memory = [_memory(pid) for pid in pool.pids()]

    # 2. Per file: in this process against a warm worker, interleaved.
    parse_file(Path("warm.html"), b"<html><body><p>Warm up the parsers of this process.</p></body></html>", options)
    per_file: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for path in files:
            data = path.read_bytes()
            times = per_file.setdefault(path.name, {"in_process_s": [], "worker_s": [], "pickled_kb": []})
            for where in ("in_process_s", "worker_s"):
                start = time.perf_counter()
                try:
                    elements = (parse_file(path, data, options) if where == "in_process_s"
                                else pool.parse(path, data, options, limits))
                except Exception:  # noqa: BLE001 - a refused file costs its time too
                    elements = []
                times[where].append(time.perf_counter() - start)
            times["pickled_kb"] = [len(pickle.dumps(elements)) / 1024]
    rows = {name: {k: round(statistics.median(v), 4) for k, v in t.items()} for name, t in per_file.items()}
    total_in = sum(r["in_process_s"] for r in rows.values())
    total_worker = sum(r["worker_s"] for r in rows.values())
    pool.close()

    # 3. Whole ingests of the docs folder: workers (the product) against threads of this process.
    work = Path(tempfile.mkdtemp(prefix="mmrag-bench-iso-"))
    base = load_settings(data_dir=work / "warm")
    embedder = ModelSet(base).text_embedder
    clip = _common.random_clip()
    with Runtime(base, ModelSet(base, clip=clip, text_embedder=embedder)) as rt:
        rt.ingestor.ingest([docs])  # warm: models, Milvus, both parse paths' imports
        pipeline.ISOLATED_KINDS = frozenset()
        rt.ingestor.ingest([docs], sync=True)
        pipeline.ISOLATED_KINDS = ISOLATED_KINDS
    ingest_s: dict[str, list[float]] = {"workers": [], "threads": []}
    for round_no in range(args.rounds):
        for mode in ("workers", "threads") if round_no % 2 == 0 else ("threads", "workers"):
            pipeline.ISOLATED_KINDS = ISOLATED_KINDS if mode == "workers" else frozenset()
            settings = load_settings(data_dir=work / f"{mode}{round_no}")
            with Runtime(settings, ModelSet(settings, clip=clip, text_embedder=embedder)) as rt:
                rt.index.ensure(embedder.signature, clip.signature)
                start = time.perf_counter()
                report = rt.ingestor.ingest([docs])
                ingest_s[mode].append(time.perf_counter() - start)
    pipeline.ISOLATED_KINDS = ISOLATED_KINDS
    shutil.rmtree(work, ignore_errors=True)
    workers_s, threads_s = statistics.median(ingest_s["workers"]), statistics.median(ingest_s["threads"])
    print(json.dumps({
        "benchmark": "parse_isolation",
        "documents": len(files),
        "startup": startup,
        "idle_worker_memory": idle_memory,
        "parse_total_in_process_s": round(total_in, 3),
        "parse_total_worker_s": round(total_worker, 3),
        "parse_worker_vs_in_process": round(total_worker / total_in, 3),
        "per_file_overhead_median_ms": round(1000 * statistics.median(
            r["worker_s"] - r["in_process_s"] for r in rows.values()), 2),
        "ingest_docs": {"files": report.added + len(report.failed), "workers_s": round(workers_s, 2),
                        "threads_s": round(threads_s, 2), "workers_vs_threads": round(workers_s / threads_s, 3),
                        "raw": {k: [round(x, 2) for x in v] for k, v in ingest_s.items()}},
        "per_file": rows,
        "rounds": args.rounds,
        "machine": _common.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
