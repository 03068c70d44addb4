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

Then ``added_cost``: what the durability steps cost. Single-file text uploads through the served API, alternately
with and without the read-back that precedes each acknowledgement (``--cost-rounds`` of each, interleaved), their
median latencies and ratio; the read-back alone (one point read and two counts); and the reopening of the
collections after a lost connection (``MilvusIndex._reopen_alone``), which runs once per reconnect, not per call.

Models: MiniLM (real), a tiny random CLIP (no CLIP weights exist offline), the default profile's LLM. Absolute
times depend on the other work on this shared machine: say what the load was when quoting them.

    python benchmarks/outage.py [--signals SIGKILL,SIGTERM,SIGSTOP,SIGKILL,SIGTERM] [--down 6] [--settle 6]
                                [--milvus-timeout 5] [--clients 3] [--seed 0] [--cost-rounds 20]
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


def added_cost(runtime, rounds: int) -> dict:
    """Upload latency with and without the read-back before the acknowledgement, side by side (interleaved), and
    the read-back and the reopening on their own."""
    import hashlib
    import statistics
    import time
    import uuid

    import httpx

    import mmrag.api.app as api_app
    from mmrag.records import Document
    from tests.test_api import A
    from tests.test_api_server import Served

    real = api_app._confirm_uploads
    latencies: dict[str, list[float]] = {"with_read_back": [], "without_read_back": []}
    app = api_app.create_app(runtime)
    try:
        with Served(app) as served, httpx.Client(timeout=120) as client:
            for i in range(rounds):
                modes = ("with_read_back", "without_read_back") if i % 2 == 0 else ("without_read_back",
                                                                                     "with_read_back")
                for mode in modes:
                    api_app._confirm_uploads = real if mode == "with_read_back" else (lambda *a, **k: None)
                    data = f"Cost probe {uuid.uuid4().hex}. The Jaguar E-Type was launched in 1961.".encode()
                    started = time.perf_counter()
                    response = client.post(served.url + "/v1/documents", headers=A,
                                           files=[("files", (f"cost-{mode}-{i}.txt", data, "text/plain"))])
                    latencies[mode].append(time.perf_counter() - started)
                    assert response.status_code == 200 and response.json()["added"] == 1, response.text
    finally:
        api_app._confirm_uploads = real
    index = runtime.index
    folder = app.state.api.tenant_dir("acme").resolve()
    probes = sorted(folder.glob("cost-with_read_back-*.txt"))
    read_back = []
    for path in probes:
        version = hashlib.sha256(path.read_bytes()).hexdigest()
        started = time.perf_counter()
        assert index.stored_state(Document.make_id(str(path), "acme"), version) is None
        read_back.append(time.perf_counter() - started)
    reopen = []
    for _ in range(5):
        index._reopen = True
        started = time.perf_counter()
        index._reopen_alone()
        reopen.append(time.perf_counter() - started)

    def ms(values: list[float]) -> float:
        return round(1000 * statistics.median(values), 1)

    return {"uploads_each": rounds,
            "upload_ms_median": {mode: ms(values) for mode, values in latencies.items()},
            "upload_ratio_with_to_without": round(statistics.median(latencies["with_read_back"])
                                                  / statistics.median(latencies["without_read_back"]), 3),
            "read_back_ms_median": ms(read_back), "reopen_after_lost_connection_ms_median": ms(reopen)}


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
    parser.add_argument("--cost-rounds", type=int, default=20, help="uploads with and without the read-back each "
                        "(0: skip)")
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
        cost = None
        if args.cost_rounds:
            note(f"added cost: {args.cost_rounds} uploads with and without the read-back")
            cost = added_cost(runtime, args.cost_rounds)
        runtime.close()
    finally:
        server.stop()
    print(json.dumps({
        "benchmark": "outage", "signals": list(signals), "down_s": args.down, "clients": args.clients,
        "milvus_timeout_s": args.milvus_timeout,
        "seed": args.seed, **run.figures(), "added_cost": cost, "load_average": os.getloadavg(),
        "machine": _common.machine(),
        "note": "clients, API and Milvus share this machine's cores; absolute times vary with other load",
    }, indent=2))


if __name__ == "__main__":
    main()
