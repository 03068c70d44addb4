"""Images through the API: `POST /v1/generate` with `images: true` runs the image generator (the tiny random
diffusers pipeline of tests/test_image_generation.py) and serves what it drew by URL."""

from __future__ import annotations

from pathlib import Path

from tests.test_api import A, B, MUSTANG_TEXT, api_settings, parse_sse, upload, wait_ready
from tests.tinydiffusion import image_settings


def test_generate_with_images_serves_them_by_url(make_runtime, tiny_llm, tiny_sd, tmp_path):
    """`images: true` runs the image generator (a tiny random diffusers pipeline) after the text: each image comes
    back as a URL the tenant can fetch, never as a server path."""
    from starlette.testclient import TestClient

    from mmrag.api.app import create_app

    runtime = make_runtime(llm=tiny_llm, api=api_settings(tmp_path), generation={"max_new_tokens": 4},
                           **image_settings(tiny_sd))
    app = create_app(runtime)
    with TestClient(app, client=("127.0.0.1", 1)) as client:
        wait_ready(client)
        upload(client, A, ("mustang.md", MUSTANG_TEXT.encode()))
        body = {"prompt": "What did the Ford Mustang of 1964 look like?", "images": True, "seed": 3}
        answer = client.post("/v1/generate", headers=A, json=body).json()
        assert answer["image_error"] is None, answer["image_error"]
        image = answer["images"][0]
        assert "path" not in image and image["url"] == f"/v1/images/{image['id']}" and image["seed"] == 3
        served = client.get(image["url"], headers=A)
        assert served.status_code == 200 and served.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get(image["url"], headers=B).status_code == 404
        staging = Path(runtime.settings.data_dir) / "api-staging"
        assert not any(p.is_file() for p in staging.rglob("*"))  # published, staging emptied
        with client.stream("POST", "/v1/generate", headers=A, json=body | {"stream": True}) as streamed:
            done = parse_sse(streamed.iter_text())[-1]
        assert done[0] == "done" and done[1]["images"][0]["url"].startswith("/v1/images/gen-")
