"""Tenancy, randomized: three tenants interleave uploads, searches (by text, by image, with filters naming the
others' ids), generations, lists, gets, image fetches and deletes through the API (tests/tenancy.py); no response
ever holds another tenant's content, and each tenant always sees exactly its own live documents."""

from __future__ import annotations

import pytest

from tests.tenancy import Tenancy, tenant_keys
from tests.test_api import api_settings, wait_ready


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3])
def test_random_interleaving_of_tenants_never_leaks(make_runtime, tiny_llm, tmp_path, seed):
    from starlette.testclient import TestClient

    from mmrag.api.app import create_app

    runtime = make_runtime(llm=tiny_llm, api=api_settings(tmp_path, keys=tenant_keys(3)),
                           generation={"max_new_tokens": 4})
    with TestClient(create_app(runtime), client=("127.0.0.1", 50000)) as client:
        wait_ready(client)
        run = Tenancy(client, tenants=3, seed=seed).play(steps=120)
    figures = run.figures()
    print(figures)
    assert run.leaks == [] and run.problems == [], figures
    # The schedule really exercised what it checks: every kind of request, cross-tenant attempts included.
    kinds = run.requests
    assert all(kinds[k] > 0 for k in ("upload", "search", "generate", "list", "get", "image", "delete")), kinds
    assert run.statuses["image 200"] and run.statuses["image 404"] and run.statuses["get 404"], run.statuses
    assert run.checked_lists >= 10


def test_the_leak_scan_finds_a_foreign_marker_and_a_foreign_image():
    """The checks themselves: a body holding another tenant's marker, id or bytes is reported."""
    import random

    from tests.tenancy import Doc, png_bytes

    class Response:
        def __init__(self, text: str = "", content: bytes = b"", content_type: str = "application/json"):
            self.text, self.content, self.headers = text, content, {"content-type": content_type}

    harness = Tenancy(client=None, tenants=2, seed=0)
    image = png_bytes(random.Random(1))
    harness.docs[1]["f" * 32] = Doc(1, "doc00001t1qabc.md", "text", b"", "DOC00001T1Qabc", doc_id="f" * 32)
    harness.images_of[1].add(image)
    harness.scan(0, "search", Response('{"text": [{"text": "TENANTMARK1Z says hi"}]}'))
    harness.scan(0, "search", Response('{"doc_id": "' + "f" * 32 + '"}'))
    harness.scan(0, "image", Response(content=image, content_type="image/png"))
    harness.scan(1, "image", Response(content=image, content_type="image/png"))  # its own: fine
    harness.scan(0, "search", Response('{"text": [{"text": "TENANTMARK0Z is its own"}]}'))
    leaks = harness.run.leaks
    assert len(leaks) == 3, leaks
    assert "t1's marker" in leaks[0] and "f" * 32 in leaks[1] and "only t[1] uploaded" in leaks[2]
