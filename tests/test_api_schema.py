"""Schemathesis against the app's own OpenAPI schema, in-process (ASGI): generated requests to every operation,
with a valid API key, find no 5xx, and every response matches its documented content type and schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.test_api import KEY_A, MUSTANG_TEXT, api_settings, wait_ready

HEADERS = {"Authorization": f"Bearer {KEY_A}"}


@pytest.fixture(scope="module")
def api_app(tmp_path_factory, text_embedder, tiny_clip, tiny_llm):
    """One app for the whole module (the schemathesis cases share it), ready and holding one document."""
    from starlette.testclient import TestClient

    from mmrag.api.app import create_app
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    tmp = tmp_path_factory.mktemp("schema")
    settings = load_settings(data_dir=tmp / "data", api=api_settings(tmp, max_new_tokens=4),
                             generation={"max_new_tokens": 4})
    runtime = Runtime(settings, ModelSet(settings, text_embedder=text_embedder, clip=tiny_clip, llm=tiny_llm))
    app = create_app(runtime)
    with TestClient(app, client=("127.0.0.1", 1)) as client:  # runs the lifespan: models and Milvus load once
        wait_ready(client)
        client.post("/v1/documents", headers=HEADERS, files=[("files", ("mustang.md", MUSTANG_TEXT.encode()))])
        yield app
    runtime.close()


@pytest.mark.slow
def test_no_server_errors_and_responses_match_the_schema(api_app):
    """Every operation, up to 12 generated cases each (deterministic), with a valid key."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            case.call_and_validate(headers=HEADERS, checks=[not_a_server_error, content_type_conformance,
                                                            response_schema_conformance])

        try:
            check()
        except Exception as exc:
            raise AssertionError(f"{operation.method.upper()} {operation.path}: {exc}") from exc
