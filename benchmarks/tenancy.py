"""Tenancy under a random interleaving of requests. Prints JSON.

Several tenants (one API key each) share one API (in process, Starlette's TestClient) and one knowledge base
(milvus-lite in a temporary folder). A seeded schedule interleaves uploads of text documents and images, searches
by text and by image (some with another tenant's image, some with filters naming another tenant's ids),
generations, lists, gets, image fetches and deletes, including gets, fetches and deletes of another tenant's ids.
Every response is scanned for another tenant's markers, ids, names and image bytes, and after each delete every
tenant's document list must equal its own live documents. The harness is tests/tenancy.py
(tests/test_tenancy.py runs a shorter schedule of the same code).

Output: steps, requests by kind, statuses by kind, document lists checked, leaks found (and the first 20), other
problems (and the first 20), seconds.

Models: MiniLM (real), a tiny random CLIP (no CLIP weights exist offline), the default profile's LLM (4 tokens per
answer).

    python benchmarks/tenancy.py [--steps 400] [--tenants 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    _common.offline_env()

    from starlette.testclient import TestClient

    from mmrag.api.app import create_app
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime
    from tests.conftest import build_clip
    from tests.tenancy import Tenancy, tenant_keys
    from tests.test_api import api_settings, wait_ready

    work = args.work or Path(tempfile.mkdtemp(prefix="mmrag-tenancy-bench-"))
    settings = load_settings(data_dir=work / "data", api=api_settings(work, keys=tenant_keys(args.tenants)),
                             generation={"max_new_tokens": 4})
    llm = None if args.no_generate else ModelSet(load_settings()).llm
    runtime = Runtime(settings, ModelSet(settings, clip=build_clip(tmp=_folder(work / "clip")), llm=llm))
    try:
        with TestClient(create_app(runtime), client=("127.0.0.1", 50000)) as client:
            wait_ready(client, timeout=300)
            run = Tenancy(client, args.tenants, args.seed, generate=not args.no_generate).play(args.steps)
    finally:
        runtime.close()
    print(json.dumps({"benchmark": "tenancy", "tenants": args.tenants, "seed": args.seed, **run.figures(),
                      "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
