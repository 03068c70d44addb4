"""The API served for real: uvicorn on a loopback port, driven over HTTP and from headless Chromium (the
playground), with a ``milvus-lite server`` as its Milvus; and ``mmrag serve``'s refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_api import A, B, KEY_A, MUSTANG_TEXT, SAMPLE, api_settings

ROOT = Path(__file__).resolve().parents[1]


class Served:
    """An app served by uvicorn on a thread (lifespan included)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the served app did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.mark.slow
def test_two_served_apps_share_a_milvus_server(make_runtime, tiny_llm, tmp_path, milvus_server):
    """Two API processes' worth of apps (as `mmrag serve --workers 2` runs) over one Milvus server: what one
    ingests, the other lists, searches and serves, tenant-confined."""
    from mmrag.api.app import create_app

    settings = {"milvus": {"uri": milvus_server.uri}, "api": api_settings(tmp_path),
                "generation": {"max_new_tokens": 4}}
    first = create_app(make_runtime(llm=tiny_llm, **settings))
    second = create_app(make_runtime(llm=tiny_llm, **settings))
    image = (SAMPLE / "images" / "mustang-1964.png").read_bytes()
    with Served(first) as one, Served(second) as two:
        added = httpx.post(f"{one.url}/v1/documents", headers=A, timeout=120, files=[
            ("files", ("mustang.md", MUSTANG_TEXT.encode())), ("files", ("mustang-1964.png", image))])
        assert added.status_code == 200 and added.json()["added"] == 2, added.text
        assert first.state.api.runtime.index.stats()["partition_key"] is True  # tenant is the partition key
        names = {d["name"] for d in httpx.get(f"{two.url}/v1/documents", headers=A).json()["documents"]}
        assert names == {"mustang.md", "mustang-1964.png"}
        assert httpx.get(f"{two.url}/v1/documents", headers=B).json()["documents"] == []
        hits = httpx.post(f"{two.url}/v1/search", headers=A, json={"text": "Ford Mustang", "k_image": 1}).json()
        assert hits["grounded"] and hits["images"]
        served = httpx.get(f"{two.url}{hits['images'][0]['blob']}", headers=A)
        assert served.status_code == 200 and served.content == image
        answer = httpx.post(f"{two.url}/v1/generate", headers=A, timeout=120,
                            json={"prompt": "When was the Ford Mustang introduced?"}).json()
        assert answer["abstained"] is False and answer["sources"]


def _mmrag(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "mmrag.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)


def test_serve_refuses_unsafe_or_impossible_setups(tmp_path):
    several = _mmrag("--data-dir", str(tmp_path), "serve", "--workers", "2")
    assert several.returncode == 3 and "needs a Milvus server" in several.stderr, several.stderr
    exposed = _mmrag("--data-dir", str(tmp_path), "serve", "--host", "0.0.0.0")
    assert exposed.returncode == 3 and "without API keys" in exposed.stderr, exposed.stderr
    no_keys = _mmrag("--data-dir", str(tmp_path), "serve", env_extra={"MMRAG_API__AUTH": "true"})
    assert no_keys.returncode == 3 and "mmrag api-key" in no_keys.stderr, no_keys.stderr


@pytest.mark.slow
def test_playground_in_headless_chromium(make_runtime, tiny_llm, tmp_path):
    """Upload, search with thumbnails and scores, a streamed answer with its sources, and an eval report, from the
    page itself; no console errors; a screenshot is kept."""
    from mmrag.api.app import create_app
    from tests.browser import open_page

    root = tmp_path / "srv"
    (root / "evalset").mkdir(parents=True)
    (root / "evalset" / "mustang.md").write_text(MUSTANG_TEXT)
    (root / "set.jsonl").write_text(json.dumps({"id": "q1", "prompt": "When was the Mustang introduced?",
                                                "gold_sources": ["mustang.md"]}) + "\n")
    kb = tmp_path / "upload"
    kb.mkdir()
    (kb / "mustang.md").write_text(MUSTANG_TEXT)
    shutil.copy(SAMPLE / "images" / "mustang-1964.png", kb / "red-ford-mustang-1964.png")
    app = create_app(make_runtime(llm=tiny_llm, api=api_settings(tmp_path), generation={"max_new_tokens": 6}))
    artifacts = Path(os.environ.get("MMRAG_ARTIFACTS") or tmp_path / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "playground.png"
    with Served(app) as served, open_page(served.url + "/", viewport=(1400, 1100)) as (page, errors):
        page.wait_for_selector("#ready.ok")
        page.fill("#api-key", KEY_A)
        page.dispatch_event("#api-key", "change")
        # Upload.
        page.set_input_files("#upload-files", [str(kb / "mustang.md"), str(kb / "red-ford-mustang-1964.png")])
        page.click("#upload-form button[type=submit]")
        page.wait_for_function("document.querySelector('#upload-report').textContent.includes('added 2')",
                               timeout=120_000)
        page.wait_for_function("document.querySelectorAll('#documents tbody tr').length === 2")
        # Search: passages with scores, image thumbnails loaded through the API (with the key).
        page.fill("#search-text", "red Ford Mustang 1964")
        page.click("#search-form button[type=submit]")
        page.wait_for_selector("#search-passages li")
        assert "score" in page.inner_text("#search-passages li")
        page.wait_for_selector("#search-images img[src^='blob:']")
        # Generate (streamed): the answer, then its sources as numbered anchors the citations link to.
        page.fill("#generate-prompt", "When was the Ford Mustang introduced?")
        page.fill("#generate-max", "6")
        page.click("#generate-form button[type=submit]")
        page.wait_for_function("document.querySelector('#answer-sources li#src-1') || "
                               "document.querySelector('#answer .error')", timeout=120_000)
        assert page.query_selector("#answer .error") is None, page.inner_text("#answer")
        for link in page.query_selector_all("#answer a.cite"):
            assert page.query_selector(link.get_attribute("href")) is not None
        # Evaluation: start a job, wait for it, open its report.
        page.fill("#eval-dataset", "set.jsonl")
        page.fill("#eval-corpus", "evalset")
        page.click("#eval-form button[type=submit]")
        page.wait_for_function("[...document.querySelectorAll('#evals td.job-status')].some(td => "
                               "td.textContent === 'done')", timeout=180_000)
        page.click("#evals button")
        page.wait_for_function("document.querySelector('#eval-report').textContent.includes('hybrid')")
        assert page.query_selector("#eval-report button.eval-file") is not None
        page.screenshot(path=str(shot), full_page=True)
        print(f"playground screenshot: {shot}")
        assert errors.all == [], errors.all
    assert shot.stat().st_size > 10_000
