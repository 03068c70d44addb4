"""The HTTP API through httpx (Starlette's TestClient) against the real app: milvus-lite in a temp dir, MiniLM, a
tiny random CLIP and a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import pytest

from mmrag.api.auth import hash_key

KEY_A = "mmrag_test-key-for-tenant-acme-0123456789abcdef"
KEY_B = "mmrag_test-key-for-tenant-globex-0123456789abcd"
SAMPLE = Path(__file__).resolve().parents[1] / "mmrag" / "sample_kb"
MUSTANG_TEXT = ("# The Ford Mustang\n\nThe Ford Mustang was introduced in April 1964 at the New York World's Fair. "
                "It had a long hood and a short rear deck.\n")
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"X-API-Key": KEY_B}


def api_settings(tmp_path: Path, **extra) -> dict:
    settings = {
        "keys": [{"hash": hash_key(KEY_A), "tenant": "acme", "name": "acme-test"},
                 {"hash": hash_key(KEY_B, "scrypt"), "tenant": "globex"}],
        "max_files": 3, "max_upload_bytes": 200_000, "max_request_bytes": 1_000_000, "max_prompt_chars": 500,
        "max_k": 10, "max_new_tokens": 16, "max_image_pixels": 256 * 256, "server_root": str(tmp_path / "srv"),
        "retry_after_s": 7,
    }
    settings.update(extra)
    (tmp_path / "srv").mkdir(exist_ok=True)
    return settings


def wait_ready(client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        if response.status_code == 200:
            return
        assert response.json()["status"] != "failed", response.json()
        time.sleep(0.05)
    raise AssertionError("the app did not become ready")


@pytest.fixture
def app_client(make_runtime, tiny_llm, tmp_path):
    """(client, state) over a fresh knowledge base; the client's peer address is loopback."""
    from starlette.testclient import TestClient

    from mmrag.api.app import create_app

    def build(**api_extra):
        runtime = make_runtime(llm=tiny_llm, api=api_settings(tmp_path, **api_extra),
                               generation={"max_new_tokens": 8})
        app = create_app(runtime)
        return TestClient(app, client=("127.0.0.1", 50000)), app.state.api

    return build


@pytest.fixture
def api(app_client):
    client, state = app_client()
    with client:
        wait_ready(client)
        yield client, state


def upload(client, headers, *files):
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/v1/documents", headers=headers, files=parts)


def png_bytes(size=(40, 40), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


# -- health, readiness, schema -------------------------------------------------------------------------------------
def test_health_readiness_and_openapi_with_examples(api):
    client, state = api
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["models"]["text_embedder"] and ready["models"]["llm"] == "tiny-random-llama"
    assert ready["models"]["support_scorer"] == "lexical"  # loaded at start with the LLM, not by a first request
    schema = client.get("/openapi.json").json()
    for path in ("/v1/documents", "/v1/documents/{doc_id}", "/v1/search", "/v1/generate", "/v1/images/{image_id}",
                 "/v1/evals", "/v1/evals/{job_id}"):
        assert path in schema["paths"], path
    search = schema["components"]["schemas"]["SearchRequest"]
    assert search["examples"][0]["text"]
    body = schema["paths"]["/v1/documents"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


def test_readiness_waits_for_loading(make_runtime, tmp_path):
    """Until the lifespan's loader has finished, /readyz and /v1 answer 503 not_ready; /healthz answers."""
    import threading

    from starlette.testclient import TestClient

    from mmrag.api.app import ApiState, create_app

    gate = threading.Event()
    original = ApiState.load

    def slow_load(self):
        gate.wait(30)
        original(self)

    runtime = make_runtime(api=api_settings(tmp_path))
    app = create_app(runtime)
    state = app.state.api
    state.load = slow_load.__get__(state)
    with TestClient(app, client=("127.0.0.1", 1)) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["status"] == "loading"
        response = client.get("/v1/documents", headers=A)
        assert response.status_code == 503 and response.json()["code"] == "not_ready"
        assert response.headers["Retry-After"] == "7"
        gate.set()
        # The loader loads the profile's real models; on a cold cache that includes converting the LLM's GGUF file,
        # which took more than 60 s in a loaded CI run. This test is about the states, not the load time.
        wait_ready(client, timeout=300)
        assert client.get("/v1/documents", headers=A).status_code == 200


# -- auth ----------------------------------------------------------------------------------------------------------
def test_missing_and_wrong_keys_get_the_same_401(api):
    client, _ = api
    none = client.get("/v1/documents")
    wrong = client.get("/v1/documents", headers={"Authorization": "Bearer mmrag_not-a-key"})
    wrong_header = client.get("/v1/documents", headers={"X-API-Key": KEY_A + "x"})
    for response in (none, wrong, wrong_header):
        assert response.status_code == 401
        assert response.json() == none.json() and response.json()["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/documents", headers=A).status_code == 200
    assert client.get("/v1/documents", headers={"X-API-Key": KEY_A}).status_code == 200
    assert client.get("/v1/documents", headers=B).status_code == 200  # the scrypt-hashed key


def test_auth_off_serves_loopback_clients_only(app_client):
    from starlette.testclient import TestClient

    client, state = app_client(keys=[], auth=False)
    with client:
        wait_ready(client)
        assert client.get("/v1/documents").status_code == 200  # loopback, no key: the settings' tenant
        remote = TestClient(client.app, client=("10.1.2.3", 40000))
        response = remote.get("/v1/documents")
        assert response.status_code == 403 and response.json()["code"] == "forbidden"


def test_auth_on_without_keys_is_a_configuration_error(make_runtime, tmp_path):
    from mmrag.api.app import create_app
    from mmrag.errors import ConfigError

    with pytest.raises(ConfigError, match="mmrag api-key"):
        create_app(make_runtime(api=api_settings(tmp_path, keys=[], auth=True)))


def test_api_key_command_prints_a_key_and_a_hash_that_verifies():
    from typer.testing import CliRunner

    from mmrag.api.auth import verify_key
    from mmrag.cli import app

    result = CliRunner().invoke(app, ["api-key", "--tenant", "acme", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tenant"] == "acme" and verify_key(data["key"], data["hash"])
    assert not verify_key(data["key"] + "x", data["hash"])


# -- documents and tenancy -----------------------------------------------------------------------------------------
def test_upload_list_get_delete_and_tenant_isolation(api):
    client, state = api
    image = (SAMPLE / "images" / "mustang-1964.png").read_bytes()
    response = upload(client, A, ("mustang.md", MUSTANG_TEXT.encode()), ("mustang-1964.png", image))
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["added"] == 2 and report["failed"] == [] and report["chunks"]["image"] == 1
    acme_ids = {d["name"]: d["doc_id"] for d in report["documents"]}
    # The same file from another tenant is another document: ids never collide.
    report_b = upload(client, B, ("mustang.md", MUSTANG_TEXT.encode())).json()
    assert report_b["added"] == 1
    assert report_b["documents"][0]["doc_id"] != acme_ids["mustang.md"]
    listed = client.get("/v1/documents", headers=A).json()["documents"]
    assert {d["name"] for d in listed} == {"mustang.md", "mustang-1964.png"}
    assert [d["name"] for d in client.get("/v1/documents", headers=B).json()["documents"]] == ["mustang.md"]
    one = client.get(f"/v1/documents/{acme_ids['mustang.md']}", headers=A).json()
    assert one["mime"] == "text/markdown" and one["chunks"]["text"] >= 1
    # Another tenant's id answers exactly like an id that does not exist.
    foreign = client.get(f"/v1/documents/{acme_ids['mustang.md']}", headers=B)
    missing = client.get("/v1/documents/0123456789abcdef0123456789abcdef", headers=B)
    assert foreign.status_code == missing.status_code == 404 and foreign.json() == missing.json()
    assert client.delete(f"/v1/documents/{acme_ids['mustang.md']}", headers=B).json() == missing.json()
    # Searches see the tenant's own hits only.
    hits_b = client.post("/v1/search", headers=B, json={"text": "Ford Mustang 1964", "k_image": 3}).json()
    assert {h["doc_id"] for h in hits_b["text"]} == {report_b["documents"][0]["doc_id"]}
    assert hits_b["images"] == []
    hits_a = client.post("/v1/search", headers=A, json={"text": "Ford Mustang 1964", "k_image": 3}).json()
    assert hits_a["images"] and hits_a["images"][0]["blob"] == f"/v1/images/{hits_a['images'][0]['id']}"
    image_url = hits_a["images"][0]["blob"]
    served = client.get(image_url, headers=A)
    assert served.status_code == 200 and served.content == image and served.headers["content-type"] == "image/png"
    assert client.get(image_url, headers=B).json() == missing.json() | {"message": "no image with that id"}
    # Delete: gone from the list, its chunks from search, its uploaded file from disk.
    folder = state.tenant_dir("acme")
    assert (folder / "mustang.md").is_file()
    assert client.delete(f"/v1/documents/{acme_ids['mustang.md']}", headers=A).json() == {
        "deleted": acme_ids["mustang.md"]}
    assert client.get(f"/v1/documents/{acme_ids['mustang.md']}", headers=A).status_code == 404
    assert not (folder / "mustang.md").exists()
    assert [d["name"] for d in client.get("/v1/documents", headers=B).json()["documents"]] == ["mustang.md"]
    after = client.post("/v1/search", headers=A, json={"text": "Ford Mustang 1964"}).json()
    assert acme_ids["mustang.md"] not in {h["doc_id"] for h in after["text"]}


def test_reupload_updates_and_bad_files_do_not_abort_the_batch(api):
    client, state = api
    first = upload(client, A, ("notes.txt", b"The Mini was launched in 1959 by the British Motor Corporation."))
    assert first.json()["added"] == 1
    again = upload(client, A, ("notes.txt", b"The Mini was launched in 1959 by the British Motor Corporation."),
                   ("broken.pdf", b"%PDF-1.4 not really a pdf"), ("empty.txt", b""))
    data = again.json()
    assert again.status_code == 200 and data["unchanged"] == 1
    assert {f["source"] for f in data["failed"]} == {"broken.pdf", "empty.txt"}
    assert [d["name"] for d in data["documents"]] == ["notes.txt"]  # the ids of what went in
    assert all("/" not in f["source"] for f in data["failed"])  # names, not server paths
    folder = state.tenant_dir("acme")
    assert not (folder / "broken.pdf").exists() and not (folder / "empty.txt").exists()
    changed = upload(client, A, ("notes.txt", b"The Mini was launched in August 1959."))
    assert changed.json()["updated"] == 1


def test_upload_names_never_escape_the_upload_folder(api, tmp_path):
    client, state = api
    names = ["../../escape.txt", "..\\..\\win-escape.txt", "/etc/cron.d/abs.txt", "sub/dir/nested.txt", "..", ".env",
             "../..", "./.ssh"]
    parts = [(name, f"Body of upload {i} about the Jaguar E-Type.".encode()) for i, name in enumerate(names)]
    reports = [upload(client, A, *parts[i:i + 3]).json() for i in range(0, len(parts), 3)]
    folder = state.tenant_dir("acme").resolve()
    stored = sorted(p.name for p in folder.iterdir())
    assert stored == ["abs.txt", "escape.txt", "nested.txt", "win-escape.txt"]
    failed = [f for r in reports for f in r["failed"]]
    assert len(failed) == 4 and all("file name" in f["reason"] for f in failed)
    upload_root = state.upload_root.resolve()
    everything = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".txt"]
    assert all(upload_root in p.resolve().parents for p in everything), everything
    assert not (tmp_path / "escape.txt").exists()
    # Control characters (clients percent-encode them on the wire; a raw one is refused, never repaired).
    from mmrag.api.errors import ApiError
    from mmrag.api.limits import safe_upload_name

    for raw in ("bad\x00name.txt", "bell\x07.txt", "", "..", ".env", "a/..", "x" * 201 + ".txt"):
        with pytest.raises(ApiError):
            safe_upload_name(raw)
    assert safe_upload_name("C:\\Users\\me\\report.pdf") == "report.pdf"


def test_upload_limits(api):
    client, _ = api
    too_many = upload(client, A, *[(f"f{i}.txt", b"four files is one too many") for i in range(4)])
    assert too_many.status_code == 413 and too_many.json()["code"] == "too_many_files"
    big = upload(client, A, ("big.txt", b"x" * 200_001), ("small.txt", b"The VW Beetle is a small car."))
    assert big.status_code == 200
    assert big.json()["added"] == 1 and "api.max_upload_bytes" in big.json()["failed"][0]["reason"]
    huge = client.post("/v1/documents", headers=A, files=[("files", ("huge.txt", b"y" * 1_100_000))])
    assert huge.status_code == 413 and huge.json()["code"] == "request_too_large"

    def chunked():
        for _ in range(20):
            yield b"z" * 100_000

    streamed = client.post("/v1/search", headers=A | {"Content-Type": "application/json"}, content=chunked())
    assert streamed.status_code == 413 and streamed.json()["code"] == "request_too_large"
    unsupported = client.post("/v1/documents", headers=A | {"Content-Type": "text/plain"}, content=b"hello")
    assert unsupported.status_code == 415 and unsupported.json()["code"] == "unsupported_media_type"
    nothing = client.post("/v1/documents", headers=A, data={"note": "no files"},
                          files=[("other", ("x.txt", b"not in the files field"))])
    assert nothing.status_code == 400 and nothing.json()["code"] == "no_files"


def test_server_side_paths_stay_inside_the_server_root(api, tmp_path):
    client, _ = api
    root = tmp_path / "srv"
    (root / "kb").mkdir()
    (root / "kb" / "beetle.md").write_text("# Beetle\n\nThe Volkswagen Beetle was built from 1938 to 2003.\n")
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "link").symlink_to(outside, target_is_directory=True)
    ok = client.post("/v1/documents", headers=A, json={"paths": ["kb"]})
    assert ok.status_code == 200 and ok.json()["added"] == 1
    for bad in ("../private/secret.txt", str(outside / "secret.txt"), "link/secret.txt"):
        response = client.post("/v1/documents", headers=A, json={"paths": [bad]})
        assert response.status_code == 403 and response.json()["code"] == "path_outside_root", bad
    missing = client.post("/v1/documents", headers=A, json={"paths": ["kb/nope.md"]}).json()
    assert missing["failed"][0]["reason"] == "no such file or directory"
    invalid = client.post("/v1/documents", headers=A, json={"paths": []})
    assert invalid.status_code == 422 and invalid.json()["code"] == "invalid_request"


# -- search --------------------------------------------------------------------------------------------------------
def test_search_shape_limits_and_image_queries(api):
    client, _ = api
    upload(client, A, ("mustang.md", MUSTANG_TEXT.encode()), ("red.png", png_bytes()))
    result = client.post("/v1/search", headers=A, json={"text": "When was the Mustang introduced?", "k_text": 2})
    data = result.json()
    assert result.status_code == 200 and set(data) == {"text", "images", "grounded"}
    hit = data["text"][0]
    assert set(hit) == {"id", "doc_id", "source", "page", "score", "scores", "text"} and "dense" in hit["scores"]
    assert data["grounded"] is True
    by_image = client.post("/v1/search", headers=A, json={"image": base64.b64encode(png_bytes()).decode(),
                                                          "k_text": 1, "k_image": 1})
    assert by_image.status_code == 200 and "clip_image" in by_image.json()["images"][0]["scores"]

    def code(body):
        response = client.post("/v1/search", headers=A, json=body)
        return response.status_code, response.json()["code"]

    assert code({"text": "x", "k_text": 11}) == (400, "k_too_large")
    assert code({"text": "x", "k_image": 11}) == (400, "k_too_large")
    assert code({"text": "x" * 501}) == (400, "prompt_too_long")
    assert code({"image": "not base64!!"}) == (400, "bad_image")
    assert code({"image": base64.b64encode(b"plain bytes").decode()}) == (400, "bad_image")
    assert code({"image": base64.b64encode(png_bytes((300, 300))).decode()}) == (400, "image_too_large")
    assert code({"text": "x", "filter": "nosuchfield == 1"}) == (400, "bad_input")
    assert code({}) == (400, "bad_input")
    assert code({"text": "x", "k_text": -1}) == (422, "invalid_request")
    assert code({"text": "x", "unknown": 1}) == (422, "invalid_request")


# -- generate ------------------------------------------------------------------------------------------------------
def test_generate_json_streaming_and_abstention(api):
    client, _ = api
    upload(client, A, ("mustang.md", MUSTANG_TEXT.encode()))
    prompt = "When was the Ford Mustang introduced?"
    response = client.post("/v1/generate", headers=A, json={"prompt": prompt, "max_new_tokens": 6})
    answer = response.json()
    assert response.status_code == 200, answer
    assert answer["abstained"] is False and answer["model"] == "tiny-random-llama"
    assert answer["sources"] and answer["sources"][0]["source"].endswith("mustang.md")
    assert answer["usage"]["completion_tokens"] <= 6
    # Streaming: token events, then one done event holding the same answer shape.
    with client.stream("POST", "/v1/generate", headers=A, json={"prompt": prompt, "max_new_tokens": 6,
                                                               "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(streamed.iter_text())
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"} and len(kinds) >= 2
    done = events[-1][1]
    assert all(isinstance(data["text"], str) for _, data in events[:-1]) and set(done) >= {
        "text", "citations", "images", "sources", "abstained"}
    assert done["sources"] == answer["sources"]
    # Nothing relevant: abstains without calling the model.
    other = client.post("/v1/generate", headers=B, json={"prompt": prompt}).json()
    assert other["abstained"] is True and other["abstain_reason"] == "no-grounding"
    # Limits.
    for body, code in (({"prompt": "x" * 501}, "prompt_too_long"), ({"prompt": "x", "k_text": 11}, "k_too_large"),
                       ({"prompt": "x", "max_new_tokens": 17}, "max_new_tokens_too_large")):
        response = client.post("/v1/generate", headers=A, json=body)
        assert response.status_code == 400 and response.json()["code"] == code
    assert client.post("/v1/generate", headers=A, json={"prompt": ""}).status_code == 422


def parse_sse(chunks) -> list[tuple[str, dict]]:
    text = "".join(chunks)
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_generation_queue_answers_429_and_a_dropped_stream_frees_its_slot(app_client):
    client, state = app_client(max_concurrent_generations=1, max_queued_generations=0)
    with client:
        wait_ready(client)
        upload(client, A, ("mustang.md", MUSTANG_TEXT.encode()))
        body = {"prompt": "When was the Ford Mustang introduced?", "max_new_tokens": 16}
        assert state.gate.try_acquire()  # a generation holds the only slot
        try:
            busy = client.post("/v1/generate", headers=A, json=body)
            assert busy.status_code == 429 and busy.json()["code"] == "too_many_generations"
            assert busy.headers["Retry-After"] == "7"
        finally:
            state.gate.release()
        with client.stream("POST", "/v1/generate", headers=A, json=body | {"stream": True}) as streamed:
            first = next(streamed.iter_lines())
            assert first == "event: token"
        # The client went away after one event: the generation is closed and the slot free again.
        deadline = time.monotonic() + 10
        while state.gate.admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.gate.admitted == 0
        assert client.post("/v1/generate", headers=A, json=body).status_code == 200
        metrics = client.get("/metrics").text
        assert 'mmrag_generations_total{outcome="answered"}' in metrics


def test_generated_images_are_served_to_their_tenant_only(api, tmp_path):
    """A generated image (a file the image generator wrote) is published into the tenant's part of the store and
    served by URL; the answer carries no server path."""
    client, state = api
    picture = tmp_path / "generated.png"
    picture.write_bytes(png_bytes(color=(0, 90, 200)))
    answer = state.publish_images({"text": "t", "images": [{"path": str(picture), "references": ["abc"],
                                                            "mode": "img2img"}]}, "acme")
    entry = answer["images"][0]
    assert "path" not in entry and entry["references"] == ["abc"] and entry["url"].startswith("/v1/images/gen-")
    served = client.get(entry["url"], headers=A)
    assert served.status_code == 200 and served.content == picture.read_bytes()
    assert client.get(entry["url"], headers=B).status_code == 404
    assert client.get("/v1/images/../../etc/passwd", headers=A).status_code == 404
    assert client.get("/v1/images/gen-" + "0" * 64 + ".png", headers=A).status_code == 404


# -- metrics -------------------------------------------------------------------------------------------------------
def test_metrics_count_requests_per_route_and_ingests(api, make_runtime, tmp_path):
    client, _ = api
    upload(client, A, ("mustang.md", MUSTANG_TEXT.encode()))
    for _ in range(3):
        client.post("/v1/search", headers=A, json={"text": "Mustang"})
    client.get("/v1/documents/ffffffffffffffffffffffffffffffff", headers=A)
    text = client.get("/metrics").text
    assert 'mmrag_http_requests_total{method="POST",route="/v1/search",status="200"} 3.0' in text
    assert 'route="/v1/documents/{doc_id}",status="404"' in text  # templates, never raw ids
    assert 'mmrag_http_request_duration_seconds_count{method="POST",route="/v1/search"} 3.0' in text
    assert 'mmrag_ingest_documents_total{outcome="added"} 1.0' in text
    # A second app in the same process starts from zero (a registry per app).
    from mmrag.api.app import create_app

    other = create_app(make_runtime(data_dir=tmp_path / "other", api=api_settings(tmp_path)))
    assert b'route="/v1/search"' not in other.state.api.metrics.render()


# -- evals ---------------------------------------------------------------------------------------------------------
def test_background_eval_job_runs_and_is_tenant_confined(api, tmp_path):
    client, _ = api
    corpus = tmp_path / "srv" / "evalset"
    corpus.mkdir(parents=True)
    (corpus / "mustang.md").write_text(MUSTANG_TEXT)
    (corpus / "beetle.md").write_text("# Beetle\n\nThe Volkswagen Beetle was built from 1938 to 2003.\n")
    (tmp_path / "srv" / "set.jsonl").write_text(
        json.dumps({"id": "q1", "prompt": "When was the Mustang introduced?", "gold_sources": ["mustang.md"]}) + "\n"
        + json.dumps({"id": "q2", "prompt": "How long was the Beetle built?", "gold_sources": ["beetle.md"]}) + "\n")
    started = client.post("/v1/evals", headers=A, json={"dataset": "set.jsonl", "corpus": "evalset"})
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["status"] in ("queued", "running")
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.get(f"/v1/evals/{job['id']}", headers=A).json()
    assert job["status"] == "done", job
    assert job["report"]["modes"]["hybrid"]["recall@5"] == 1.0
    assert "report.json" in job["files"] and job["summary"]["report"] == "report.json"
    report_file = client.get(f"/v1/evals/{job['id']}/files/report.json", headers=A)
    assert report_file.status_code == 200 and report_file.json()["dataset"]["records"] == 2
    assert client.get(f"/v1/evals/{job['id']}", headers=B).status_code == 404
    assert client.get(f"/v1/evals/{job['id']}/files/report.json", headers=B).status_code == 404
    assert client.get(f"/v1/evals/{job['id']}/files/..%2F..%2Fsecret", headers=A).status_code == 404
    assert [j["id"] for j in client.get("/v1/evals", headers=A).json()["jobs"]] == [job["id"]]
    assert client.get("/v1/evals", headers=B).json()["jobs"] == []
    # The tenant's own knowledge base is untouched by the evaluation's.
    assert client.get("/v1/documents", headers=A).json()["documents"] == []
    outside = client.post("/v1/evals", headers=A, json={"dataset": "../set.jsonl", "corpus": "evalset"})
    assert outside.status_code == 403
    failing = client.post("/v1/evals", headers=A, json={"dataset": "halueval"}).json()
    while failing["status"] in ("queued", "running"):
        time.sleep(0.1)
        failing = client.get(f"/v1/evals/{failing['id']}", headers=A).json()
    assert failing["status"] == "failed" and failing["error"]["code"] == "bad_input"
    too_many = client.post("/v1/evals", headers=A, json={"dataset": "set.jsonl", "corpus": "evalset", "limit": 201})
    assert too_many.status_code == 400 and too_many.json()["code"] == "limit_too_large"


# -- errors --------------------------------------------------------------------------------------------------------
def test_errors_are_json_with_stable_codes_and_no_traces(api, monkeypatch):
    client, state = api
    assert client.get("/v1/nothing-here", headers=A).json()["code"] == "not_found"
    assert client.put("/v1/search", headers=A).json()["code"] == "method_not_allowed"
    bad_json = client.post("/v1/search", headers=A | {"Content-Type": "application/json"}, content=b"{not json")
    assert bad_json.status_code == 422 and bad_json.json()["code"] == "invalid_request"

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail /srv/path")

    monkeypatch.setattr(state.runtime.index, "documents", broken)
    response = client.get("/v1/documents", headers=A)
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
    assert "secret" not in response.text and "Traceback" not in response.text

    from mmrag.errors import StoreError

    def down(*args, **kwargs):
        raise StoreError("cannot reach Milvus at http://milvus:19530")

    monkeypatch.setattr(state.runtime.index, "documents", down)
    response = client.get("/v1/documents", headers=A)
    assert response.status_code == 503 and response.json()["code"] == "store_unavailable"



def test_every_project_error_maps_to_a_status_and_code():
    import mmrag.errors as errors
    from mmrag.api.errors import status_of

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.MmragError)]
    assert len(classes) >= 7
    seen = {c: status_of(c("x")) for c in classes}
    assert seen[errors.BadInputError] == (400, "bad_input") and seen[errors.NotFoundError] == (404, "not_found")
    assert seen[errors.StoreError] == (503, "store_unavailable")
    assert all(code != "internal_error" for _, code in seen.values())


def test_generation_gate_serves_in_arrival_order_and_times_out():
    import anyio

    from mmrag.api.errors import ApiError
    from mmrag.api.limits import GenerationGate

    async def scenario() -> None:
        gate = GenerationGate(1, 2, timeout_s=0.3, retry_after_s=3)
        order: list[int] = []
        await gate.acquire()  # running

        async def waiter(n: int) -> None:
            await gate.acquire()
            order.append(n)
            await anyio.sleep(0.01)
            gate.release()

        async with anyio.create_task_group() as group:
            group.start_soon(waiter, 1)
            await anyio.sleep(0.005)
            group.start_soon(waiter, 2)
            await anyio.sleep(0.005)
            with pytest.raises(ApiError) as full:  # one running, two waiting: full
                await gate.acquire()
            assert full.value.status == 429 and full.value.headers == {"Retry-After": "3"}
            gate.release()
        assert order == [1, 2] and gate.admitted == 0 and gate.running == 0
        await gate.acquire()
        with pytest.raises(ApiError, match="within 0.3 s"):
            await gate.acquire()
        assert gate.admitted == 1 and not gate.try_acquire()

    anyio.run(scenario)
