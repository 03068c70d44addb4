"""Hostile input: ingest a generated corpus of >= 200 hostile files in a child `mmrag ingest` and report what
happened to each. Prints JSON: files tried, ingested and rejected (by reason and by family), expectation
violations, secrets leaked from outside the knowledge-base folder (must be 0), requests that reached a loopback
HTTP server the corpus points at (must be 0), folders written outside the data dir (must be none), the child's
peak RSS and wall time, and with --per-file, each file's parse time and the slowest files.

The corpus and the checks are tests/hostilecorpus.py (tests/test_hostile.py runs the same thing).

    python benchmarks/hostile.py [--work DIR] [--per-file]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)


def per_file_times(cases) -> dict:
    """Each file parsed alone in this process: seconds and outcome (the slowest ten listed)."""
    from ingest.parsers import parse_file
    from ingest.pipeline import parse_options
    from mmrag.config import load_settings
    from mmrag.errors import BadInputError

    options = parse_options(load_settings())
    parse_file(Path("warm.txt"), b"warm up the parsers\n", options)  # imports are not a file's cost
    times = []
    for case in cases:
        try:
            data = case.path.read_bytes()
        except OSError:
            continue
        started = time.perf_counter()
        try:
            parse_file(case.path, data, options)
            outcome = "parsed"
        except BadInputError:
            outcome = "rejected"
        times.append((time.perf_counter() - started, case.path.name[:60], outcome))
    times.sort(reverse=True)
    return {"max_s": round(times[0][0], 2), "median_s": round(times[len(times) // 2][0], 4),
            "slowest": [{"file": n, "s": round(t, 2), "outcome": o} for t, n, o in times[:10]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--per-file", action="store_true", help="also time every file's parse in this process")
    args = parser.parse_args()
    _common.offline_env()
    import crashharness
    import hostilecorpus

    work = args.work or Path(tempfile.mkdtemp(prefix="mmrag-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("kb", "outside", "data", "home", "cwd"):
        shutil.rmtree(work / name, ignore_errors=True)
    clip = crashharness.make_clip_folder(work / "tiny-clip")
    with hostilecorpus.LoopbackServer() as server:
        kb, cases = hostilecorpus.build_hostile_corpus(work, _common.shared_data(), loopback_url=server.url)
        run = hostilecorpus.run_ingest(work, kb, clip)
        leaks = hostilecorpus.leaked(work, work)
        summary = hostilecorpus.summarize(cases, run, leaks, len(server.hits))
        if args.per_file:
            summary["per_file_parse"] = per_file_times(cases)
    print(json.dumps({"benchmark": "hostile", "machine": _common.machine(), **summary}, indent=2))


if __name__ == "__main__":
    main()
