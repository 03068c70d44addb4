"""docker-compose.yml: Milvus standalone (milvus, etcd, MinIO) with health checks and named volumes, and the
project's service configured to use that Milvus and MinIO. No Docker engine runs here; Debian's docker-compose
validates the file without one when it is installed (CI installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from mmrag.config import load_settings

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_defines_milvus_standalone_with_health_checks_and_volumes():
    compose = _compose()
    services = compose["services"]
    assert {"milvus", "etcd", "minio", "mmrag"} <= set(services)
    for name in ("milvus", "etcd", "minio"):
        assert "test" in services[name]["healthcheck"], name
        volume = services[name]["volumes"][0].split(":")[0]
        assert volume in compose["volumes"], f"{name} keeps its data in a named volume"
    assert services["milvus"]["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert services["milvus"]["environment"]["MINIO_ADDRESS"] == "minio:9000"
    assert services["milvus"]["depends_on"]["etcd"]["condition"] == "service_healthy"


def test_compose_service_settings_are_valid_project_settings(monkeypatch):
    """The mmrag service's environment must parse as this project's settings and point at that Milvus and MinIO."""
    service = _compose()["services"]["mmrag"]
    assert service["build"] == "." and (ROOT / "Dockerfile").is_file()
    assert service["depends_on"]["milvus"]["condition"] == "service_healthy"
    for key, value in service["environment"].items():
        if key.startswith("MMRAG_"):
            monkeypatch.setenv(key, value.replace("${MINIO_ACCESS_KEY:-minioadmin}", "minioadmin")
                               .replace("${MINIO_SECRET_KEY:-minioadmin}", "minioadmin"))
    settings = load_settings()
    assert settings.milvus_uri == "http://milvus:19530"
    assert settings.blob_url.startswith("s3://")
    assert settings.blobs.storage_options["client_kwargs"]["endpoint_url"] == "http://minio:9000"


def test_docker_compose_parses_the_file_when_installed():
    binary = shutil.which("docker-compose")
    if binary is None:
        import pytest

        pytest.skip("Debian's docker-compose is not installed (CI installs it)")
    run = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_compose_api_service_serves_with_keys_on_the_milvus_server(monkeypatch):
    """The `api` service runs `mmrag serve` on every interface with several workers, which the API allows only with
    a Milvus server and API keys: its environment must give both, and blobs in MinIO."""
    from mmrag.api.auth import Authenticator, hash_key

    service = _compose()["services"]["api"]
    command = service["command"]
    assert command[:1] == ["serve"] and command[command.index("--host") + 1] == "0.0.0.0"
    assert service["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert "readyz" in " ".join(service["healthcheck"]["test"])
    assert any(str(port).endswith(":8000") for port in service["ports"])
    keys = f'[{{"hash": "{hash_key("example-key")}", "tenant": "acme"}}]'
    for key, value in service["environment"].items():
        if key.startswith("MMRAG_"):
            monkeypatch.setenv(key, value.replace("${MINIO_ACCESS_KEY:-minioadmin}", "minioadmin")
                               .replace("${MINIO_SECRET_KEY:-minioadmin}", "minioadmin")
                               .replace("${MMRAG_API_KEYS:-[]}", keys))
    settings = load_settings()
    assert settings.milvus_uri == "http://milvus:19530" and settings.blob_url.startswith("s3://")
    assert Authenticator(settings).enabled and settings.api.keys[0].tenant == "acme"
    assert str(settings.api.server_root) == "/kb"


def test_dockerfile_exposes_the_api_and_documents_the_gpu_variant():
    text = (ROOT / "Dockerfile").read_text()
    assert "EXPOSE 8000" in text and "ARG TORCH_INDEX" in text and "--gpus all" in text
