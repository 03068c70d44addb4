"""Crash safety of ingestion: SIGKILL `mmrag ingest` at random points, rerun it, compare with a clean run. JSON.

Builds a corpus of >= 300 files (documents and images) from ../shared/data plus generated variants, ingests it
with plain `mmrag ingest` while killing the process at random points (epoch 0), then removes, changes and adds
files and repeats with `mmrag ingest --sync` (later epochs). After epoch 0 and at the end, the knowledge base must
equal a clean, uninterrupted ingest of the same corpus chunk for chunk: ids, vectors, metadata, documents and
blobs; no duplicates, nothing missing, no orphaned blobs. The harness itself is tests/crashharness.py (the tests
run a reduced version of it). Models: real MiniLM (fp32) and a tiny random CLIP loaded from a local folder.

    python benchmarks/crash.py [--files 300] [--kills 20] [--sync-epochs 2] [--seed 0] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--sync-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="working folder [default: a temporary one]")
    args = parser.parse_args()
    _common.offline_env()
    import crashharness

    work = args.work or Path(tempfile.mkdtemp(prefix="mmrag-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    clip = crashharness.make_clip_folder(work / "tiny-clip")
    result = crashharness.run_harness(work, _common.shared_data(), clip, n_files=args.files, kills=args.kills,
                                      sync_epochs=args.sync_epochs, seed=args.seed,
                                      log=lambda m: print(m, file=sys.stderr, flush=True))
    out = {"benchmark": "crash", "machine": _common.machine(), **result.to_json()}
    print(json.dumps(out, indent=2))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
