"""A reproduction of the milvus-lite fault behind "acknowledged uploads lost their chunks across a restart".

``milvus-lite server`` (3.2.x) opens a collection from disk on the first request that names it
(``MilvusLite.get_collection``) and caches the ``Collection`` object, without a lock. A restarted server has
nothing open, so when several requests for the same collection arrive together, each can construct its own
``Collection`` (each replays the write-ahead log and starts a write-ahead log file of the same number); the last one
constructed is cached, the others are dropped. A write that went to a dropped instance was acknowledged and is gone:
it is in no memtable the server reads, and the cached instance truncates and later deletes the log file it went
to. A dropped instance also starts its own background compaction, which rewrites data files and the manifest behind
the cached instance's back: rows flushed long before the restart can vanish at the next one.

This script has no mmrag code in it: a server, one collection, a restart, and then ``--threads`` clients that each
upsert one row at the same moment as their first call to the restarted server. Every upsert is acknowledged; the
rows missing afterwards are lost writes. With ``--gate`` the clients first open the collection one at a time (one
``get_load_state`` call, what ``mmrag.index.MilvusIndex`` now does after a reconnect), and nothing is lost.

    python benchmarks/milvus_lite_open_race.py --rounds 10 --threads 8 [--gate]

Prints JSON: rounds, upserts acknowledged, rows lost, rounds that lost any.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import MilvusServer  # noqa: E402

NAME = "race"
DIM = 4


def create(client) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index("v", index_type="FLAT", metric_type="L2")
    client.create_collection(NAME, schema=schema, index_params=index)


def row(key: str) -> dict:
    return {"id": key, "v": [0.1, 0.2, 0.3, float(len(key))]}


def one_round(server: MilvusServer, round_no: int, threads: int, gate: bool, signal: str) -> dict:
    from pymilvus import MilvusClient

    server.stop(signal)
    server.start()
    clients = [MilvusClient(server.uri) for _ in range(threads)]  # connected before the race: Connect opens nothing
    if gate:
        for client in clients[:1]:
            client.get_load_state(NAME)  # opens the collection on the server, alone
    barrier = threading.Barrier(threads)
    acked: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        key = f"r{round_no}-t{i}"
        barrier.wait()
        try:
            clients[i].upsert(NAME, [row(key)])
        except Exception as exc:  # noqa: BLE001 - an unacknowledged write is not a lost one
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        with lock:
            acked.append(key)

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    check = clients[0]
    check.load_collection(NAME)
    present = {r["id"] for r in check.query(NAME, filter=f'id like "r{round_no}-%"', output_fields=["id"])}
    for client in clients:
        client.close()
    return {"acked": len(acked), "lost": sorted(k for k in acked if k not in present), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--gate", action="store_true", help="open the collection alone before the concurrent writes")
    parser.add_argument("--signal", default="SIGKILL", choices=["SIGKILL", "SIGTERM"])
    args = parser.parse_args()
    from pymilvus import MilvusClient

    with tempfile.TemporaryDirectory() as tmp:
        server = MilvusServer(Path(tmp) / "data")
        server.start()
        try:
            client = MilvusClient(server.uri)
            create(client)
            client.upsert(NAME, [row(f"seed{i}") for i in range(20)])
            client.flush(NAME)
            client.close()
            started = time.monotonic()
            rounds = [one_round(server, n, args.threads, args.gate, args.signal) for n in range(args.rounds)]
        finally:
            server.stop("SIGKILL")
    print(json.dumps({
        "rounds": len(rounds), "threads": args.threads, "gate": args.gate, "signal": args.signal,
        "upserts_acknowledged": sum(r["acked"] for r in rounds),
        "acknowledged_rows_lost": sum(len(r["lost"]) for r in rounds),
        "rounds_that_lost_rows": sum(bool(r["lost"]) for r in rounds),
        "errors": sum(len(r["errors"]) for r in rounds),
        "lost": [r["lost"] for r in rounds if r["lost"]][:5],
        "seconds": round(time.monotonic() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
