"""Milvus outages under API load. Prints JSON.

The API (``create_app``, served by uvicorn on 127.0.0.1) runs over a ``milvus-lite server`` on 127.0.0.1. Client
threads keep up a mix of searches (40%), single-file uploads (25%: a short text with a unique marker, or a PNG),
deletes (10%), document lists (10%) and generations (15%, 4 tokens), and retry every write that did not get a 2xx
answer until it is acknowledged. The server is stopped once per ``--signals`` entry (SIGKILL, SIGTERM), kept
down ``--down`` seconds, and started again on the same port and data dir; SIGSTOP hangs it instead (the port stays
open, nothing answers) and SIGCONT lets it go on. The harness is tests/outageharness.py
(tests/test_api_faults.py runs a shorter version of the same code).

Output: requests (by kind), what the requests that overlapped an outage got, the failures (status and code, how
many carried Retry-After, p50/p99/max latency), per outage the time until a search and /readyz succeeded again
after the restarted server accepted connections, the writes (acknowledged uploads and deletes, retries) and the
check of the store (acknowledged uploads lost, unexpected documents, orphaned and wrong chunks), and ``problems``
(every violated expectation; empty on success).

Models: MiniLM (real), a tiny random CLIP (no CLIP weights exist offline), the default profile's LLM. Absolute
times depend on the other work on this shared machine: say what the load was when quoting them.

    python benchmarks/outage.py [--signals SIGKILL,SIGTERM,SIGSTOP,SIGKILL,SIGTERM] [--down 6] [--settle 6]
                                [--milvus-timeout 5] [--clients 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)


def note(message: str) -> None:
    print(f"[outage bench] {message}", file=sys.stderr, flush=True)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signals", default="SIGKILL,SIGTERM,SIGSTOP,SIGKILL,SIGTERM",
                        help="SIGKILL/SIGTERM stop the server and start it again; SIGSTOP hangs it, then SIGCONT")
    parser.add_argument("--milvus-timeout", type=float, default=5.0, help="milvus.timeout_s (what a hung server "
                        "costs a call)")
    parser.add_argument("--down", type=float, default=6.0, help="seconds each outage lasts")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds of load after each recovery")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    _common.offline_env()

    from mmrag.api.app import create_app
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime
    from tests.conftest import MilvusServer, build_clip
    from tests.outageharness import run_outages
    from tests.test_api import api_settings

    work = args.work or Path(tempfile.mkdtemp(prefix="mmrag-outage-bench-"))
    server = MilvusServer(work / "milvus")
    note(f"milvus-lite server on {server.uri}, started in {server.start():.1f} s")
    try:
        settings = load_settings(data_dir=work / "data", milvus={"uri": server.uri, "index_type": "FLAT",
                                                                  "timeout_s": args.milvus_timeout},
                                 api=api_settings(work, max_files=1), generation={"max_new_tokens": 4})
        llm = None
        if not args.no_generate:
            note("loading the default profile's LLM")
            llm = ModelSet(load_settings()).llm
        models = ModelSet(settings, clip=build_clip(tmp=_folder(work / "clip")), llm=llm)
        runtime = Runtime(settings, models)
        app = create_app(runtime)
        signals = tuple(s.strip() for s in args.signals.split(",") if s.strip())
        note(f"load with {args.clients} clients; outages: {', '.join(signals)}, {args.down:.0f} s each")
        run = run_outages(app, server, signals=signals, warmup_s=args.warmup, down_s=args.down,
                          settle_s=args.settle, clients=args.clients, generate=not args.no_generate,
                          seed=args.seed, fail_fast_s=5 + 2 * args.milvus_timeout)
        runtime.close()
    finally:
        server.stop()
    print(json.dumps({
        "benchmark": "outage", "signals": list(signals), "down_s": args.down, "clients": args.clients,
        "milvus_timeout_s": args.milvus_timeout,
        "seed": args.seed, **run.figures(), "load_average": os.getloadavg(), "machine": _common.machine(),
        "note": "clients, API and Milvus share this machine's cores; absolute times vary with other load",
    }, indent=2))


if __name__ == "__main__":
    main()
