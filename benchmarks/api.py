"""HTTP API under load: concurrent clients on loopback mixing search (90%) and generate (10%). Prints JSON.

Setup: a knowledge base of HaluEval passages (``eval.datasets.halueval``, real MiniLM, no CLIP weights exist
offline) is ingested with ``mmrag ingest``; then ``mmrag serve`` runs in its own process on 127.0.0.1 with the
default profile (SmolLM2-135M for generation), one API key, and a generation queue deep enough for every client.
The clients run in this process (asyncio + httpx, one connection each).

1. Reference answers, serially: every search query and generate prompt the load will use, once each (greedy
   decoding, so a prompt always gets the same answer).
2. Load: ``--clients`` clients for ``--duration`` seconds; each picks search with probability 0.9 (a HaluEval
   question) or generate (one of ``--prompts`` questions, ``--max-new-tokens`` tokens), waits for the answer, and
   goes again. Requests still in flight at the end are awaited; throughput is answers per second of wall time,
   that drain included.
3. Checks: ``lost`` counts requests without a response (transport errors, timeouts), ``errors`` non-200 answers,
   ``wrong`` answers that differ from the serial reference (search: the hit ids; generate: the text).

Output: requests, throughput (req/s overall and per route), latency p50/p99/max per route (ms), errors, lost, wrong.
The machine is shared: absolute figures move with the other work on it (say so when quoting them).

    python benchmarks/api.py [--clients 32] [--duration 60] [--passages 300] [--queries 100] [--prompts 4]
                             [--max-new-tokens 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)

KEY = "mmrag_benchmark-key-0123456789abcdefghijklmnop"


def note(message: str) -> None:
    print(f"[api bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index] * 1000, 1)


def server_env(work: Path, clients: int, max_new_tokens: int) -> dict[str, str]:
    from mmrag.api.auth import hash_key

    return os.environ | {
        "MMRAG_DATA_DIR": str(work / "kb"),
        "MMRAG_API__KEYS": json.dumps([{"hash": hash_key(KEY), "tenant": "bench"}]),
        "MMRAG_API__MAX_QUEUED_GENERATIONS": str(clients),
        "MMRAG_API__QUEUE_TIMEOUT_S": "600",
        "MMRAG_API__MAX_NEW_TOKENS": str(max_new_tokens),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }


async def call(client: Any, route: str, body: dict[str, Any]) -> tuple[int | None, Any, float]:
    started = time.perf_counter()
    try:
        response = await client.post(route, json=body)
    except Exception as exc:  # noqa: BLE001 - a lost request is counted, not raised
        return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - started
    elapsed = time.perf_counter() - started
    try:
        data = response.json()
    except ValueError:
        data = response.text
    return response.status_code, data, elapsed


def fingerprint(route: str, data: Any) -> Any:
    if route == "/v1/search":
        return [hit["id"] for hit in data["text"]]
    return data["text"]


async def run_load(url: str, args: argparse.Namespace, questions: list[str], prompts: list[str]) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    timeout = httpx.Timeout(900.0)
    gen = {"max_new_tokens": args.max_new_tokens}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        # 1. Serial references.
        note(f"serial references: {len(questions)} searches, {len(prompts)} generations")
        reference: dict[tuple[str, str], Any] = {}
        for q in questions:
            status, data, _ = await call(client, "/v1/search", {"text": q, "k_text": 5, "k_image": 0})
            assert status == 200, data
            reference[("/v1/search", q)] = fingerprint("/v1/search", data)
        for p in prompts:
            status, data, _ = await call(client, "/v1/generate", {"prompt": p, **gen})
            assert status == 200, data
            reference[("/v1/generate", p)] = fingerprint("/v1/generate", data)

        # 2. Load.
        note(f"load: {args.clients} clients for {args.duration} s")
        rng = random.Random(0)
        results: list[tuple[str, int | None, float, bool]] = []
        stop_at = time.perf_counter() + args.duration

        async def worker(seed: int) -> None:
            local = random.Random(seed)
            while time.perf_counter() < stop_at:
                if local.random() < 0.9:
                    route, key = "/v1/search", local.choice(questions)
                    body = {"text": key, "k_text": 5, "k_image": 0}
                else:
                    route, key = "/v1/generate", local.choice(prompts)
                    body = {"prompt": key, **gen}
                status, data, elapsed = await call(client, route, body)
                wrong = status == 200 and fingerprint(route, data) != reference[(route, key)]
                results.append((route, status, elapsed, wrong))

        started = time.perf_counter()
        await asyncio.gather(*(worker(rng.randrange(1 << 30)) for _ in range(args.clients)))
        wall = time.perf_counter() - started

    routes: dict[str, Any] = {}
    for route in ("/v1/search", "/v1/generate"):
        rows = [r for r in results if r[0] == route]
        ok = [r[2] for r in rows if r[1] == 200]
        routes[route] = {"requests": len(rows), "ok": len(ok), "throughput_rps": round(len(ok) / wall, 2),
                         "p50_ms": percentile(ok, 50), "p99_ms": percentile(ok, 99),
                         "max_ms": percentile(ok, 100)}
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r[1])] = statuses.get(str(r[1]), 0) + 1
    return {
        "wall_s": round(wall, 1),
        "requests": len(results),
        "throughput_rps": round(sum(1 for r in results if r[1] == 200) / wall, 2),
        "routes": routes,
        "statuses": statuses,
        "errors": sum(1 for r in results if r[1] is not None and r[1] != 200),
        "lost": sum(1 for r in results if r[1] is None),
        "wrong": sum(1 for r in results if r[3]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--passages", type=int, default=300, help="HaluEval passages in the knowledge base")
    parser.add_argument("--queries", type=int, default=100, help="distinct search queries (HaluEval questions)")
    parser.add_argument("--prompts", type=int, default=4, help="distinct generate prompts")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    _common.offline_env()

    from eval.datasets import halueval

    work = args.work or Path(tempfile.mkdtemp(prefix="mmrag-api-bench-"))
    records, build = halueval(_common.shared_data() / "halueval" / "qa_dev.jsonl", limit=args.passages)
    corpus = build(work / "corpus")
    env = server_env(work, args.clients, args.max_new_tokens)
    mmrag = [sys.executable, "-m", "mmrag.cli"]
    note(f"ingesting {len(corpus.files)} passages")
    started = time.perf_counter()
    subprocess.run([*mmrag, "ingest", "--tenant", "bench", "--json", str(corpus.root)], env=env, check=True,
                   stdout=subprocess.DEVNULL, cwd=_common.ROOT)
    ingest_s = time.perf_counter() - started
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*mmrag, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              cwd=_common.ROOT, stderr=subprocess.PIPE)
    try:
        import httpx

        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                sys.exit(f"mmrag serve exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > 300:
                sys.exit("mmrag serve did not become ready within 300 s")
            time.sleep(0.25)
        ready_s = time.perf_counter() - started
        questions = [r.prompt for r in records[: args.queries]]
        prompts = questions[: args.prompts]
        load = asyncio.run(run_load(url, args, questions, prompts))
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    generated = [line for line in metrics.splitlines() if line.startswith("mmrag_generations_total")]
    print(json.dumps({
        "benchmark": "api", "clients": args.clients, "duration_s": args.duration, "mix": {"search": 0.9,
                                                                                           "generate": 0.1},
        "passages": len(corpus.files), "max_new_tokens": args.max_new_tokens, "ingest_s": round(ingest_s, 1),
        "server_ready_s": round(ready_s, 1), **load, "server_generation_counters": generated,
        "machine": _common.machine(),
        "note": "clients and server share this machine's cores; absolute figures vary with other load",
    }, indent=2))


if __name__ == "__main__":
    main()
