"""One ``Settings`` object, built once at the entry point and passed down.

Precedence, highest first: keyword arguments (the CLI's options), environment variables (prefix ``MMRAG_``, nested
sections with ``__``, e.g. ``MMRAG_MILVUS__URI``), the profile file, the defaults below. A profile is a TOML data
file: a built-in name (``mmrag/profiles/NAME.toml``) or a path to a ``.toml`` file. No stage reads the environment;
no module keeps a global settings object.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mmrag.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
ROLES: tuple[str, ...] = ("clip", "text_embedder", "llm", "image_generator", "reranker", "support_scorer")
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8", "int4"]  # int8, int4: models.llm on CPU only


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    """Where a model role's weights come from: a local folder or file, a package that ships them, or a hub name.

    They are tried in that order; the first that exists wins (see ``mmrag.models.resolve``).
    """

    name: str | None = None  # hub name ("org/model") or, for CLIP, the open_clip architecture ("ViT-B-32")
    pretrained: str | None = None  # open_clip pretrained tag ("laion2b_s34b_b79k")
    path: str | None = None  # local folder or weights file
    package: str | None = None  # an installed Python package that ships the weights
    file: str | None = None  # file (glob) inside the folder or package, e.g. a GGUF file
    backend: str | None = None  # an implementation that needs no weights (e.g. a lexical support scorer)
    optional: bool = False  # an optional role degrades with a clear notice instead of failing
    precision: Precision = "auto"
    batch_size: int = Field(default=32, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class ModelsSection(_Section):
    clip: ModelSpec | None = None
    text_embedder: ModelSpec | None = None
    llm: ModelSpec | None = None
    image_generator: ModelSpec | None = None
    reranker: ModelSpec | None = None
    support_scorer: ModelSpec | None = None


class MilvusSection(_Section):
    uri: str | None = None  # None: embedded milvus-lite under the data dir; else e.g. http://host:19530
    token: str | None = None
    db_name: str | None = None
    collection: str = "mmrag"  # knowledge base name; the chunk and document collections derive from it
    index_type: str = "HNSW"  # dense index: HNSW | IVF_FLAT | FLAT | AUTOINDEX
    index_params: dict[str, Any] = Field(default_factory=lambda: {"M": 16, "efConstruction": 200})
    write_batch: int = Field(default=256, ge=1)
    # The longest one Milvus call may take before it fails (StoreError, HTTP 503): a server that hangs (stopped,
    # partitioned away) would otherwise hold every request forever. None: no limit.
    timeout_s: float | None = Field(default=30.0, gt=0)
    # BM25 ignores English stop words (mmrag.index.BM25_ANALYZER); fixed when a knowledge base is created.
    bm25_stop_words: bool = True

    @field_validator("collection")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not value.replace("_", "").isalnum() or not value[0].isalpha():
            raise ValueError(f"collection name {value!r} must start with a letter and hold only letters, digits, _")
        return value


class BlobSection(_Section):
    url: str | None = None  # None: <data dir>/blobs; any fsspec URL, e.g. s3://bucket/prefix
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # Unreferenced blobs younger than this survive a sweep (None: 0 s embedded, 600 s with a Milvus server).
    sweep_grace_s: float | None = Field(default=None, ge=0)


class IngestSection(_Section):
    include: list[str] = Field(default_factory=list)  # globs relative to each folder; empty: every supported file
    exclude: list[str] = Field(default_factory=lambda: [".*", "**/.*", "**/__pycache__/**"])
    chunk_tokens: int = Field(default=256, ge=16)  # bounded by the text embedder's max sequence length
    overlap_tokens: int = Field(default=32, ge=0)
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    max_archive_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_archive_ratio: float = Field(default=200.0, gt=1)
    min_image_side: int = Field(default=16, ge=1)
    fetch_remote: bool = False
    image_batch: int = Field(default=32, ge=1)
    text_batch: int = Field(default=32, ge=1)
    # PDF, DOCX, PPTX, HTML and Markdown are parsed in worker processes (ingest/isolation.py). A file whose parse
    # takes longer than this is refused and its worker killed; one that needs more memory than parse_memory_mb
    # (on top of an idle worker's own, about 2.1 GB of address space) likewise. 0: no memory limit.
    parse_timeout_s: float = Field(default=120.0, gt=0)
    parse_memory_mb: int = Field(default=2048, ge=0)


class RetrievalSection(_Section):
    k_text: int = Field(default=5, ge=1, le=100)
    k_image: int = Field(default=3, ge=0, le=100)
    max_k: int = Field(default=100, ge=1)
    fusion: Literal["rrf", "weighted"] = "rrf"
    # RRF's k: 5, not the customary 60. `mmrag eval halueval --retrieval-only` (1,000 questions over 999 passages)
    # measured hybrid recall@5 / MRR 0.990 / 0.977 at 60, 0.992 / 0.980 at 20, 0.996 / 0.980 at 10, 0.996 / 0.982
    # at 5: with two signals, a small k lets a passage one signal ranks first beat one both rank middling.
    rrf_k: int = Field(default=5, ge=1)
    weights: dict[str, float] = Field(default_factory=lambda: {"dense": 0.5, "bm25": 0.5, "clip": 0.5})
    candidates: int = Field(default=4, ge=1)  # fetch k * candidates before reranking and MMR
    mmr_lambda: float = Field(default=0.8, ge=0.0, le=1.0)  # 1.0: pure relevance; lower: more diverse
    duplicate_cosine: float = Field(default=0.97, gt=0.0, le=1.0)  # passages this similar count as one
    # Relevance needed for a grounding to count: the reranker's probability when one is configured, else the
    # dense cosine of the best passage (or CLIP cosine / context cosine of the best image).
    threshold: float = Field(default=0.35, ge=-1.0, le=1.0)
    rerank_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_query_chars: int = Field(default=4000, ge=1)
    max_query_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)


class GenerationSection(_Section):
    # The prompt template: a built-in name (mmrag/profiles/prompts/NAME.toml) or a path to a TOML file.
    template: str = "grounded"
    max_new_tokens: int = Field(default=160, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0  # sampling is reproducible for the same seed and inputs
    stop: list[str] = Field(default_factory=list)
    repetition_penalty: float = Field(default=1.0, ge=1.0, le=3.0)  # on generated tokens only
    max_source_chars: int = Field(default=1200, ge=100)  # each passage is clipped to this in the prompt
    max_prompt_tokens: int = Field(default=1800, ge=128)  # sources are dropped (lowest ranked first) to fit
    # free: the model writes its own [n] markers. constrained: the model may not write markers; the decoder ends
    # each statement with the marker of the given source that best supports it (for small models that do not
    # cite on their own; see generation.text._Citer).
    citation_mode: Literal["free", "constrained"] = "free"
    # A cited sentence whose cited sources the support scorer (models.support_scorer) scores below this is
    # unsupported: for the lexical scorer, the share of its content words the sources hold; for a model, its
    # probability that the sources back the sentence.
    min_support: float = Field(default=0.5, ge=0.0, le=1.0)
    # Keep text addressed to the model out of the sources: from a control token or source delimiter on, and
    # sentences that instruct the assistant (generation.prompting.withheld_text). Answers list what was withheld.
    withhold_instructions: bool = True


class ImageSection(_Section):
    """Reference-guided image generation (``generation.image``); the model is ``[models.image_generator]``."""

    mode: Literal["auto", "ip-adapter", "img2img", "text"] = "auto"
    references: int = Field(default=2, ge=0, le=16)  # at most this many reference images guide a picture
    # A retrieved image guides the picture when its context text's dense cosine, or its CLIP text->image cosine,
    # reaches these; below both, the picture follows the prompt alone (text mode, and the result says so).
    reference_threshold: float = Field(default=0.35, ge=-1.0, le=1.0)
    reference_clip_threshold: float = Field(default=0.25, ge=-1.0, le=1.0)
    # CPU-sensible defaults for few-step models (SD-Turbo): one step, no classifier-free guidance, 512 px.
    steps: int = Field(default=1, ge=1, le=200)
    width: int = Field(default=512, ge=64, le=2048)
    height: int = Field(default=512, ge=64, le=2048)
    guidance_scale: float = Field(default=0.0, ge=0.0, le=30.0)  # > 1 enables classifier-free guidance
    negative_prompt: str = ""  # used with guidance_scale > 1
    strength: float = Field(default=0.5, gt=0.0, le=1.0)  # img2img: how far from the reference the picture moves
    ip_adapter_scale: float = Field(default=0.6, ge=0.0, le=2.0)  # how strongly the references steer
    enrich: bool = True  # add the references' context and passage facts to the image prompt
    max_facts: int = Field(default=3, ge=0, le=20)  # top passages a fact may come from
    max_reference_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_reference_pixels: int = Field(default=40_000_000, ge=1)
    out_dir: Path | None = None  # None: <data dir>/images

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the autoencoder works on 8x8 pixel blocks)")
        return value


class RuntimeSection(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = None  # None: every core the process may use
    # Converted model weights (e.g. a GGUF file de-quantised once) are kept here so a second start is fast.
    # None: $XDG_CACHE_HOME/mmrag, else ~/.cache/mmrag.
    cache_dir: Path | None = None

    @property
    def cache_path(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "mmrag"


class ApiKeySpec(_Section):
    """One API key, stored as a hash (``mmrag api-key`` prints a new key and this line), bound to a tenant."""

    hash: str  # "sha256:<hex>" or "scrypt:<n>:<r>:<p>:<salt hex>:<hash hex>"
    tenant: str = "default"
    name: str | None = None  # a label for logs, never the key itself

    @field_validator("hash")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if scheme not in ("sha256", "scrypt") or ":" not in value:
            raise ValueError("an API key hash must start with sha256: or scrypt: (mmrag api-key prints one)")
        return value


class ApiSection(_Section):
    """``mmrag serve``: keys, tenancy and limits of the HTTP API."""

    keys: list[ApiKeySpec] = Field(default_factory=list)
    # None: on when keys are configured. Without auth every request is the settings' tenant, and only loopback
    # clients are served (``mmrag serve`` refuses any other bind address).
    auth: bool | None = None
    upload_dir: Path | None = None  # None: <data dir>/uploads (one folder per tenant below it)
    server_root: Path | None = None  # server-side paths (documents by path, eval sets) must lie inside it
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(default=32 * 1024 * 1024, ge=1)  # per uploaded file
    max_files: int = Field(default=32, ge=1)  # per upload request
    max_image_pixels: int = Field(default=16_000_000, ge=1)  # query images
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_k: int = Field(default=50, ge=1)
    max_new_tokens: int = Field(default=512, ge=1)
    max_concurrent_generations: int = Field(default=1, ge=1)
    max_queued_generations: int = Field(default=8, ge=0)  # waiting beyond the running ones; more get 429
    queue_timeout_s: float = Field(default=60.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1)
    max_eval_records: int = Field(default=200, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMRAG_", env_nested_delimiter="__", extra="forbid")

    profile: str = "default"
    data_dir: Path = Path("mmrag-data")
    tenant: str = "default"
    models: ModelsSection = Field(default_factory=ModelsSection)
    milvus: MilvusSection = Field(default_factory=MilvusSection)
    blobs: BlobSection = Field(default_factory=BlobSection)
    ingest: IngestSection = Field(default_factory=IngestSection)
    retrieval: RetrievalSection = Field(default_factory=RetrievalSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    image: ImageSection = Field(default_factory=ImageSection)
    api: ApiSection = Field(default_factory=ApiSection)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ProfileSource(settings_cls, init_settings))

    @property
    def milvus_uri(self) -> str:
        """The URI pymilvus connects to: the configured server, or the embedded store under the data dir."""
        return self.milvus.uri or str(self.data_dir / "milvus.db")

    @property
    def blob_url(self) -> str:
        """Where this collection's image blobs live: one folder (or prefix) per collection, so a sweep or a
        ``delete --all`` in one collection never touches the images of another sharing the data dir or bucket."""
        base = self.blobs.url or str(self.data_dir / "blobs")
        return f"{base.rstrip('/')}/{self.milvus.collection}"


class _ProfileSource(PydanticBaseSettingsSource):
    """The profile file as the lowest-precedence settings source."""

    def __init__(self, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._init = init_settings

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        init_kwargs = getattr(self._init, "init_kwargs", {}) or {}
        name = init_kwargs.get("profile") or os.environ.get("MMRAG_PROFILE") or "default"
        data = read_profile(name)
        data.pop("profile", None)
        return data


def profile_path(name: str) -> Path:
    """The file of a profile: a path to a ``.toml`` file, or a built-in profile name."""
    candidate = Path(name).expanduser()
    if candidate.suffix == ".toml":
        if not candidate.is_file():
            raise ConfigError(f"profile file {str(candidate)!r} does not exist")
        return candidate
    builtin = PROFILES_DIR / f"{name}.toml"
    if not builtin.is_file():
        raise ConfigError(
            f"unknown profile {name!r}: built-in profiles are {', '.join(available_profiles())}; "
            "or pass a path to a .toml file"
        )
    return builtin


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def read_profile(name: str) -> dict[str, Any]:
    path = profile_path(name)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile {str(path)!r} is not valid TOML: {exc}") from exc


def load_settings(**overrides: Any) -> Settings:
    """Build the settings; ``overrides`` are the entry point's options (``None`` values are ignored)."""
    from pydantic import ValidationError

    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
