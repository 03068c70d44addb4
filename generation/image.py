"""Reference-guided image generation: pictures guided by the reference images retrieved from the knowledge base.

    outcome = generate_images(runtime, prompt, grounding, ImageRequest(mode="auto", seed=7))
    outcome.images[0].path        # a PNG whose text chunks carry the prompt, seed, model, mode and references

Steps of one call (``generate_images``):
  1. check the request and load the image generator (``ModelSet.image_generator``; unavailable: an error saying
     what to configure, and the caller's text generation goes on);
  2. pick the reference images: retrieved image hits that pass ``image.reference_threshold`` (context-text cosine)
     or ``image.reference_clip_threshold`` (CLIP text->image cosine), read from the blob store and checked (size,
     pixels, decodable); one bad reference is skipped with a note, never the whole call;
  3. choose the mode: ``ip-adapter`` (text-to-image conditioned on every reference, through diffusers'
     ``load_ip_adapter``), ``img2img`` (from the best reference, with a strength) or ``text`` (no reference passed;
     the result says so). ``auto`` takes ip-adapter when an IP-Adapter is configured and matches the pipeline,
     else img2img, else text;
  4. enrich the image prompt from the grounding (the references' context text, then facts from the top passages)
     within the text encoder's token limit, counted with the pipeline's own tokenizer;
  5. denoise (seeded: the same seed and inputs give the same image), with a progress bar;
  6. write PNG files whose text chunks carry the provenance, and return ``GeneratedImage`` records.

The model comes from the profile's ``[models.image_generator]`` role: a local diffusers folder (``path``) or a hub
name found in the local hub cache (``name``). Options: ``tiny_autoencoder`` (a hub name or folder of an
``AutoencoderTiny``, e.g. madebyollin/taesd, used in place of the full VAE), ``ip_adapter`` (a hub repository or a
local folder in the IP-Adapter layout, e.g. h94/IP-Adapter), ``ip_adapter_subfolder``, ``ip_adapter_weight``,
``ip_adapter_image_encoder``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from mmrag.errors import BadInputError, ConfigError, MmragError, ModelUnavailableError

if TYPE_CHECKING:
    from PIL import Image

    from mmrag.config import ImageSection, ModelSpec, RuntimeSection
    from mmrag.models import Resolution
    from mmrag.records import Grounding, Hit
    from mmrag.runtime import Runtime

logger = logging.getLogger(__name__)

Mode = Literal["auto", "ip-adapter", "img2img", "text"]
MODES: tuple[str, ...] = ("auto", "ip-adapter", "img2img", "text")

# Pipelines with the text-to-image call, ``load_ip_adapter`` and an image-to-image sibling (AutoPipeline).
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
# Where an IP-Adapter's files sit in the h94/IP-Adapter layout, per pipeline family.
IP_ADAPTER_DEFAULTS = {
    "sd": {"subfolder": "models", "weight": "ip-adapter_sd15.safetensors", "image_encoder": "image_encoder"},
    "sdxl": {"subfolder": "sdxl_models", "weight": "ip-adapter_sdxl.safetensors", "image_encoder": "image_encoder"},
}
_IMAGE_TASK = re.compile(r",?\s+(?:and|then)\s+(?:also\s+)?(?:describe|explain|list|tell|write|summari[sz]e|give)\b.*$",
                         re.IGNORECASE | re.DOTALL)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of and or in on at to for from with by is are was were be this that its it as "
                  "image picture photo illustration draw show me generate create make describe".split())


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrichment:
    """One piece of grounding added to the image prompt: where it came from and the words added."""

    chunk_id: str
    kind: Literal["reference", "passage"]
    text: str


@dataclass(frozen=True)
class GeneratedImage:
    """One generated picture and its provenance (the same fields as the PNG's text chunks)."""

    path: str
    mode: Literal["ip-adapter", "img2img", "text"]
    references: tuple[str, ...]  # chunk ids of the reference images that guided it, best first
    seed: int
    prompt: str  # the user's prompt
    enriched_prompt: str  # what the text encoder saw
    enrichment: tuple[Enrichment, ...] = ()
    model: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # steps, size, guidance, strength, scale, dtype
    note: str | None = None  # e.g. why no reference guided it
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part (text_encoder, unet, vae, ...)

    def provenance(self) -> dict[str, Any]:
        """The fields written into the PNG's text chunks."""
        return {"prompt": self.prompt, "enriched_prompt": self.enriched_prompt, "seed": self.seed,
                "model": self.model, "mode": self.mode, "references": list(self.references)}

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "mode": self.mode, "references": list(self.references), "seed": self.seed,
                "prompt": self.prompt, "enriched_prompt": self.enriched_prompt,
                "enrichment": [{"chunk_id": e.chunk_id, "kind": e.kind, "text": e.text} for e in self.enrichment],
                "model": self.model, "parameters": self.parameters, "note": self.note, "timings": self.timings}


@dataclass(frozen=True)
class ImageRequest:
    """What a caller asks for; ``None`` fields take the profile's ``[image]`` settings."""

    mode: Mode | None = None
    references: int | None = None  # at most this many reference images guide the picture
    seed: int | None = None
    out_dir: Path | None = None
    steps: int | None = None
    progress: bool = False


@dataclass(frozen=True)
class ImageOutcome:
    """Images and what happened on the way: notes (skipped references, fallbacks) and the error that stopped
    image generation, if one did (text generation is never stopped by it)."""

    images: tuple[GeneratedImage, ...] = ()
    notes: tuple[str, ...] = ()
    error: MmragError | None = None

    @property
    def error_message(self) -> str | None:
        return str(self.error) if self.error is not None else None


@dataclass(frozen=True)
class Reference:
    """A usable reference image: its hit and the decoded RGB picture."""

    hit: "Hit"
    image: "Image.Image"


# ---------------------------------------------------------------------------------------------------------------
# Metadata in PNG files
# ---------------------------------------------------------------------------------------------------------------


def save_png(image: "Image.Image", path: Path, record: GeneratedImage) -> None:
    """Write the PNG atomically with the provenance as UTF-8 text chunks (plus the whole record as ``mmrag``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in record.provenance().items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    info.add_itxt("mmrag", json.dumps(record.to_json(), ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance a generated PNG carries: prompt, enriched_prompt, seed, model, mode, references."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if "mmrag" not in text:
        raise BadInputError(f"{path} carries no mmrag provenance")
    out: dict[str, Any] = {k: text[k] for k in ("prompt", "enriched_prompt", "model", "mode") if k in text}
    out["seed"] = int(text["seed"])
    out["references"] = json.loads(text["references"])
    out["record"] = json.loads(text["mmrag"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# The loaded model
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _IPAdapterState:
    """A loaded IP-Adapter, detached from the UNet between ip-adapter calls (other modes run the plain UNet)."""

    processors: dict[str, Any]
    projection: Any
    image_encoder: Any
    feature_extractor: Any


class ImageGenerator:
    """A loaded diffusers pipeline (Stable Diffusion 1.x/2.x or SDXL family) and its optional IP-Adapter."""

    def __init__(self, pipe: Any, name: str, *, family: str, device: str, dtype: Any,
                 options: dict[str, Any] | None = None, autoencoder: str = "vae") -> None:
        self.pipe = pipe
        self.name = name
        self.family = family
        self.device = device
        self.dtype = dtype
        self.options = dict(options or {})
        self.autoencoder = autoencoder
        self._lock = threading.RLock()
        self._ip: _IPAdapterState | None = None
        self._ip_error: MmragError | None = None
        self._img2img: Any = None
        if device == "cpu":
            _channels_last(pipe)

    # -- tokens -----------------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        """Tokens the text encoder reads, begin and end tokens included (77 for CLIP text encoders)."""
        return int(self.pipe.tokenizer.model_max_length)

    def count_tokens(self, text: str) -> int:
        return len(self.pipe.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    # -- IP-Adapter -------------------------------------------------------------------------------------------
    @property
    def has_ip_adapter(self) -> bool:
        return bool(self.options.get("ip_adapter"))

    def ip_adapter_error(self) -> MmragError | None:
        """Load the configured IP-Adapter once; the error that prevents it (not configured, missing, mismatched)."""
        with self._lock:
            if self._ip is not None:
                return None
            if self._ip_error is not None:
                return self._ip_error
            try:
                self._ip = self._load_ip_adapter()
            except MmragError as exc:
                self._ip_error = exc
            return self._ip_error

    def _ip_files(self) -> tuple[str, str, str, str, Path | None]:
        source = str(self.options.get("ip_adapter") or "")
        if not source:
            raise ConfigError("the ip-adapter mode needs an IP-Adapter: set models.image_generator.options."
                              "ip_adapter to a hub repository (e.g. \"h94/IP-Adapter\") or a local folder in "
                              "that layout")
        defaults = IP_ADAPTER_DEFAULTS[self.family]
        subfolder = str(self.options.get("ip_adapter_subfolder", defaults["subfolder"]))
        weight = str(self.options.get("ip_adapter_weight", defaults["weight"]))
        encoder = str(self.options.get("ip_adapter_image_encoder", defaults["image_encoder"]))
        folder = Path(source).expanduser()
        if folder.is_dir():
            file = folder / subfolder / weight
            if not file.is_file():
                raise ModelUnavailableError(f"IP-Adapter weights {file} do not exist (models.image_generator.options."
                                            "ip_adapter_subfolder / ip_adapter_weight name the file in the folder)")
            return str(folder), subfolder, weight, encoder, file
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(source, weight, subfolder=subfolder or None,
                                        local_files_only=_hub_offline()))
        except Exception as exc:  # noqa: BLE001 - not cached offline, unknown repo, no network
            raise ModelUnavailableError(
                f"IP-Adapter {source}/{subfolder}/{weight} is not available ({type(exc).__name__}); put it in the "
                "local hub cache or set models.image_generator.options.ip_adapter to a local folder") from exc
        return source, subfolder, weight, encoder, file

    def _check_ip_adapter(self, file: Path, label: str) -> int:
        """Compare the adapter's layer shapes with the UNet before loading it; returns its image-embedding width."""
        if file.suffix != ".safetensors":
            return -1
        from safetensors import safe_open

        unet = self.pipe.unet
        cross = int(unet.config.cross_attention_dim)
        layers = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"IP-Adapter {label} is not a readable safetensors file: {exc}") from exc
        keys = [k for k in shapes if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight")]
        widths = {shapes[k][1] for k in keys}
        proj = shapes.get("image_proj.proj.weight")
        if not keys or not any(k.startswith("image_proj.") for k in shapes):
            raise ConfigError(f"IP-Adapter {label} has no image_proj/ip_adapter weights: not an IP-Adapter file")
        if len(keys) != len(layers) or widths != {cross} or (proj is not None and proj[0] != 4 * cross):
            raise ConfigError(
                f"IP-Adapter {label} does not match the pipeline {self.name}: it adapts {len(keys)} cross-attention "
                f"layers of width {sorted(widths)}, the UNet has {len(layers)} of width {cross}. Use an IP-Adapter "
                f"trained for this model family ({self.family}: IP-Adapter layout "
                f"{IP_ADAPTER_DEFAULTS[self.family]['subfolder']}/{IP_ADAPTER_DEFAULTS[self.family]['weight']})")
        return int(proj[1]) if proj is not None else -1

    def _load_ip_adapter(self) -> _IPAdapterState:
        source, subfolder, weight, encoder, file = self._ip_files()
        label = f"{source}/{subfolder}/{weight}"
        embed_dim = self._check_ip_adapter(file, label) if file is not None else -1
        pipe = self.pipe
        try:
            pipe.load_ip_adapter(source, subfolder=subfolder, weight_name=weight, image_encoder_folder=encoder,
                                 local_files_only=_hub_offline() or Path(source).is_dir())
        except Exception as exc:  # noqa: BLE001 - diffusers raises KeyError/RuntimeError/OSError on a bad adapter
            self._detach_ip_adapter()
            raise ConfigError(f"cannot load IP-Adapter {label} into {self.name}: {type(exc).__name__}: {exc}") from exc
        image_encoder = getattr(pipe, "image_encoder", None)
        projection_dim = getattr(getattr(image_encoder, "config", None), "projection_dim", None)
        if image_encoder is None or (embed_dim > 0 and projection_dim != embed_dim):
            self._detach_ip_adapter()
            found = "none" if image_encoder is None else f"one with {projection_dim}-d embeddings"
            raise ConfigError(f"IP-Adapter {label} needs a CLIP image encoder with {embed_dim}-d embeddings in "
                              f"{source}/{subfolder}/{encoder} (models.image_generator.options.ip_adapter_image_"
                              f"encoder); found {found}")
        pipe.image_encoder.to(device=self.device, dtype=self.dtype)
        state = _IPAdapterState(dict(pipe.unet.attn_processors), pipe.unet.encoder_hid_proj, pipe.image_encoder,
                                pipe.feature_extractor)
        self._detach_ip_adapter()
        logger.info("IP-Adapter %s loaded for %s", label, self.name)
        return state

    def _attach_ip_adapter(self) -> None:
        assert self._ip is not None
        unet = self.pipe.unet
        unet.set_attn_processor(dict(self._ip.processors))
        unet.encoder_hid_proj = self._ip.projection
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        self.pipe.register_modules(image_encoder=self._ip.image_encoder, feature_extractor=self._ip.feature_extractor)

    def _detach_ip_adapter(self) -> None:
        feature_extractor = getattr(self.pipe, "feature_extractor", None)
        self.pipe.unload_ip_adapter()
        if getattr(self.pipe, "feature_extractor", None) is None and feature_extractor is not None:
            self.pipe.register_modules(feature_extractor=feature_extractor)

    # -- running ----------------------------------------------------------------------------------------------
    def _image_to_image(self) -> Any:
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
        return self._img2img

    def run(self, mode: str, prompt: str, references: Sequence["Image.Image"], *, seed: int, steps: int, width: int,
            height: int, guidance_scale: float, strength: float, ip_adapter_scale: float, negative_prompt: str = "",
            progress: bool = False) -> tuple["Image.Image", dict[str, float], dict[str, Any]]:
        """One image; returns it, seconds per part, and the parameters actually used."""
        import torch

        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        common: dict[str, Any] = {"prompt": prompt, "guidance_scale": guidance_scale, "generator": generator,
                                  "output_type": "pil"}
        if negative_prompt and guidance_scale > 1.0:
            common["negative_prompt"] = negative_prompt
        parameters: dict[str, Any] = {"steps": steps, "width": width, "height": height,
                                      "guidance_scale": guidance_scale, "dtype": str(self.dtype).replace("torch.", ""),
                                      "device": self.device, "autoencoder": self.autoencoder}
        with self._lock:
            if mode == "img2img":
                pipe = self._image_to_image()
                # num_inference_steps * strength steps run; ask for enough that `steps` of them do.
                total = max(steps, math.ceil(steps / strength - 1e-9))
                init = fit_image(references[0], width, height)
                call = dict(common, image=init, strength=strength, num_inference_steps=total)
                parameters.update(strength=strength, scheduled_steps=total)
            else:
                pipe = self.pipe
                call = dict(common, num_inference_steps=steps, width=width, height=height)
                if mode == "ip-adapter":
                    self._attach_ip_adapter()
                    self.pipe.set_ip_adapter_scale(ip_adapter_scale)
                    call["ip_adapter_image"] = [list(references)]
                    parameters.update(ip_adapter_scale=ip_adapter_scale, ip_adapter=str(self.options["ip_adapter"]))
            pipe.set_progress_bar_config(disable=not progress, leave=False, desc=f"image ({mode})")
            try:
                with part_timer(self.pipe) as timings:
                    image = pipe(**call).images[0]
            finally:
                if mode == "ip-adapter":
                    self._detach_ip_adapter()
        return image, timings, parameters


def fit_image(image: "Image.Image", width: int, height: int) -> "Image.Image":
    """Centre-crop to the target aspect ratio, then resize (img2img starts from exactly width x height)."""
    from PIL import Image

    w, h = image.size
    target = width / height
    if w / h > target:
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        image = image.crop((left, 0, left + new_w, h))
    elif w / h < target:
        new_h = max(1, round(w / target))
        top = (h - new_h) // 2
        image = image.crop((0, top, w, top + new_h))
    return image.resize((width, height), Image.Resampling.LANCZOS)


@contextmanager
def part_timer(pipe: Any) -> Iterator[dict[str, float]]:
    """Seconds spent in each part of a pipeline call (text encoder, IP-Adapter image encoder, UNet, VAE), measured
    with forward hooks; the dict is filled when the block ends."""
    parts: dict[str, list[Any]] = {
        "text_encoder": [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)],
        "image_encoder": [getattr(pipe, "image_encoder", None)],
        "unet": [getattr(pipe, "unet", None)],
        "vae": [getattr(getattr(pipe, "vae", None), "encoder", None),
                getattr(getattr(pipe, "vae", None), "decoder", None)],
    }
    totals = {name: 0.0 for name in parts}
    starts: dict[int, float] = {}
    handles = []

    def pre(module: Any, *_: Any) -> None:
        starts[id(module)] = time.perf_counter()

    def post_for(name: str):
        def post(module: Any, *_: Any) -> None:
            started = starts.pop(id(module), None)
            if started is not None:
                totals[name] += time.perf_counter() - started
        return post

    for name, modules in parts.items():
        for module in modules:
            if module is not None and hasattr(module, "register_forward_pre_hook"):
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post_for(name)))
    result: dict[str, float] = {}
    started = time.perf_counter()
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
        result.update({name: round(value, 4) for name, value in totals.items()})
        result["total"] = round(time.perf_counter() - started, 4)


@contextmanager
def _quiet_loading(show: bool) -> Iterator[None]:
    """diffusers' loading bar and config notices only when progress details are logged (``--verbose``)."""
    from diffusers.utils import logging as diffusers_logging

    bars = diffusers_logging.is_progress_bar_enabled()
    verbosity = diffusers_logging.get_verbosity()
    if not show:
        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity(max(verbosity, diffusers_logging.ERROR))
    try:
        yield
    finally:
        if not show:
            diffusers_logging.set_verbosity(verbosity)
            if bars:
                diffusers_logging.enable_progress_bar()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def _pipeline_class(folder: Path) -> str:
    """The pipeline class a diffusers folder declares; a clear error for a folder of another kind."""
    index = folder / "model_index.json"
    if not index.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) if folder.is_dir() else "not a folder"
        raise ConfigError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json; it holds: {found or 'nothing'}). "
            "models.image_generator.path must name a folder saved with diffusers' save_pretrained, such as a local "
            "copy of stabilityai/sd-turbo")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{index} is not a valid diffusers model_index.json: {exc}") from exc
    if name not in SUPPORTED_PIPELINES:
        raise ConfigError(f"{folder} holds a {name}; image generation needs a Stable Diffusion 1.x/2.x or SDXL "
                          f"text-to-image pipeline ({', '.join(sorted(SUPPORTED_PIPELINES))})")
    return name


def load_image_generator(resolution: "Resolution", spec: "ModelSpec", runtime: "RuntimeSection") -> ImageGenerator:
    """Load the pipeline the role resolved to, on the configured device and precision (fp16 on a GPU, bf16 on a
    CPU with bf16 instructions, fp32 otherwise; ``precision`` in the profile overrides)."""
    from mmrag.compat import ensure_torchvision
    from mmrag.device import configure_threads, pick_device, pick_dtype

    configure_threads(runtime.torch_threads)
    device = pick_device(runtime.device)
    dtype = pick_dtype(spec.precision, device)
    location = Path(resolution.location)
    if resolution.source == "path" and location.is_file():
        raise ConfigError(f"{location} is a single file; models.image_generator.path must name a diffusers pipeline "
                          "folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    class_name = _pipeline_class(location) if location.is_dir() else None
    ensure_torchvision()
    try:
        from diffusers import AutoPipelineForText2Image

        with _quiet_loading(logger.isEnabledFor(logging.INFO)):
            pipe = AutoPipelineForText2Image.from_pretrained(
                str(location) if location.is_dir() else resolution.location, dtype=dtype,
                local_files_only=resolution.source != "hub")
    except MmragError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailableError(f"cannot load the image generator from {resolution.location}: "
                                    f"{type(exc).__name__}: {exc}. {resolution.note}") from exc
    class_name = class_name or type(pipe).__name__
    family = SUPPORTED_PIPELINES.get(type(pipe).__name__) or SUPPORTED_PIPELINES.get(class_name or "")
    if family is None or not hasattr(pipe, "load_ip_adapter"):
        raise ConfigError(f"{resolution.location} loads as {type(pipe).__name__}; image generation needs a Stable "
                          "Diffusion 1.x/2.x or SDXL text-to-image pipeline")
    autoencoder = "vae"
    tiny = spec.options.get("tiny_autoencoder")
    if tiny:
        from diffusers import AutoencoderTiny

        tiny_path = Path(str(tiny)).expanduser()
        try:
            with _quiet_loading(logger.isEnabledFor(logging.INFO)):
                vae = AutoencoderTiny.from_pretrained(str(tiny_path) if tiny_path.is_dir() else str(tiny),
                                                      dtype=dtype,
                                                      local_files_only=tiny_path.is_dir() or _hub_offline())
        except Exception as exc:  # noqa: BLE001
            raise ModelUnavailableError(
                f"cannot load the tiny autoencoder {tiny}: {type(exc).__name__}: {exc}. Put it in the local hub cache, "
                "set models.image_generator.options.tiny_autoencoder to a local AutoencoderTiny folder, or remove the "
                "option to decode with the pipeline's own VAE") from exc
        pipe.register_modules(vae=vae)
        autoencoder = f"tiny:{tiny_path.name if tiny_path.is_dir() else tiny}"
    pipe.to(device)
    if resolution.source == "path":  # the weights identify the model: name it by its folder
        name = location.name
    else:
        name = spec.name or resolution.location
    logger.info("image generator %s loaded from %s (%s, %s, %s)", name, resolution.location, device, dtype, autoencoder)
    return ImageGenerator(pipe, name, family=family, device=device, dtype=dtype, options=spec.options,
                          autoencoder=autoencoder)


def _channels_last(pipe: Any) -> None:
    """Convolutions in the channels-last layout, where oneDNN's CPU kernels are fastest. Measured here in bf16 at
    512 px: the tiny autoencoder decodes in 0.28 s against 1.03 s in the default layout (identical pixels), and a
    UNet step takes 1.85 s against 1.96 s (cosine 0.99992 to the default layout's output)."""
    import torch

    for part in ("unet", "vae"):
        module = getattr(pipe, part, None)
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------------------
# Prompt enrichment
# ---------------------------------------------------------------------------------------------------------------


def image_subject(prompt: str) -> str:
    """The picture part of a prompt: a trailing text task ("..., and describe its key features") is dropped."""
    subject = _IMAGE_TASK.sub("", " ".join(prompt.split())).strip(" ,;")
    return subject or prompt.strip()


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1}


def _best_fact(passage: str, topic: set[str], max_words: int = 24) -> str:
    """The passage sentence that shares the most words with the topic (first sentence on ties), clipped."""
    sentences = [s.strip() for s in _SENTENCE.split(" ".join(passage.split())) if s.strip()]
    if not sentences:
        return ""
    best = max(sentences, key=lambda s: (len(_words(s) & topic), -sentences.index(s)))
    words = best.split()
    return " ".join(words[:max_words]).rstrip(" ,;:.")


def enrich_prompt(prompt: str, references: Sequence["Hit"], passages: Sequence["Hit"], count_tokens,
                  max_tokens: int) -> tuple[str, tuple[Enrichment, ...]]:
    """The image prompt: the prompt's picture part, then the references' context text, then one fact from each top
    passage, each added whole only while the text encoder's token limit holds (counted with its tokenizer)."""
    text = image_subject(prompt)
    if count_tokens(text) > max_tokens:  # the prompt alone is too long: keep the words that fit
        words = text.split()
        while words and count_tokens(" ".join(words)) > max_tokens:
            words.pop()
        return " ".join(words), ()
    topic = _words(text)
    candidates: list[Enrichment] = []
    for hit in references:
        context = " ".join(hit.chunk.context.split())
        if context:
            candidates.append(Enrichment(hit.chunk.id, "reference", _best_fact(context, topic | _words(context))))
    for hit in passages:
        fact = _best_fact(hit.chunk.text, topic)
        if fact:
            candidates.append(Enrichment(hit.chunk.id, "passage", fact))
    used: list[Enrichment] = []
    seen: set[str] = {text.lower()}
    for piece in candidates:
        if not piece.text or piece.text.lower() in seen:
            continue
        trial = f"{text}. {piece.text}"
        if count_tokens(trial) <= max_tokens:
            text = trial
            used.append(piece)
            seen.add(piece.text.lower())
    return text, tuple(used)


# ---------------------------------------------------------------------------------------------------------------
# The call
# ---------------------------------------------------------------------------------------------------------------


def reference_passes(hit: "Hit", settings: "ImageSection") -> bool:
    """A reference guides a picture when its context text or its CLIP image is close enough to the prompt."""
    scores = hit.scores
    return (scores.get("dense", -1.0) >= settings.reference_threshold
            or scores.get("clip", -1.0) >= settings.reference_clip_threshold)


def load_reference(runtime: "Runtime", hit: "Hit", settings: "ImageSection") -> "Image.Image":
    """A reference's picture as RGB, read from the blob store; refuses huge, unreadable or truncated images."""
    from ingest.safety import check_image
    from mmrag.encoders import ClipEncoder

    if not hit.chunk.blob:
        raise BadInputError(f"reference {hit.chunk.id} has no image blob")
    data = runtime.blobs.get(hit.chunk.blob)
    if len(data) > settings.max_reference_bytes:
        raise BadInputError(f"reference image {hit.chunk.id} is {len(data):,} bytes; the limit is "
                            f"{settings.max_reference_bytes:,} (image.max_reference_bytes)")
    checked = check_image(data, settings.max_reference_pixels, what=f"reference image {hit.chunk.id}")
    return ClipEncoder.to_rgb(checked.image)


def _file_name(prompt: str, record_key: str, mode: str, seed: int) -> str:
    slug = "-".join(_WORD.findall(image_subject(prompt).lower()))[:48].strip("-") or "image"
    digest = hashlib.sha256(record_key.encode()).hexdigest()[:10]
    return f"{slug}-{mode}-s{seed}-{digest}.png"


def generate_images(runtime: "Runtime", prompt: str, grounding: "Grounding | None",
                    request: ImageRequest | None = None) -> ImageOutcome:
    """Generate a reference-guided picture for a prompt from its grounding; never raises for a model or input
    problem: the outcome carries the error and notes, so the caller's text still returns."""
    request = request or ImageRequest()
    notes: list[str] = []
    try:
        return _generate(runtime, prompt, grounding, request, notes)
    except MmragError as exc:
        logger.warning("image generation failed: %s", exc)
        return ImageOutcome(notes=tuple(notes), error=exc)


def _generate(runtime: "Runtime", prompt: str, grounding: "Grounding | None", request: ImageRequest,
              notes: list[str]) -> ImageOutcome:
    settings = runtime.settings.image
    # 1. Check the request; load the model.
    asked = request.mode or settings.mode
    if asked not in MODES:
        raise BadInputError(f"unknown image mode {asked!r}: use one of {', '.join(MODES)}")
    if not prompt or not prompt.strip():
        raise BadInputError("empty prompt: an image needs a prompt")
    wanted = settings.references if request.references is None else request.references
    if wanted < 0:
        raise BadInputError(f"references must be >= 0, got {wanted}")
    steps = settings.steps if request.steps is None else request.steps
    if steps < 1:
        raise BadInputError(f"steps must be >= 1, got {steps}")
    seed = runtime.settings.generation.seed if request.seed is None else int(request.seed)
    generator: ImageGenerator = runtime.models.image_generator

    # 2. Reference images: those that pass the threshold, readable and within the limits.
    hits = list(grounding.image_hits) if grounding is not None else []
    passing = [h for h in hits if reference_passes(h, settings)]
    references: list[Reference] = []
    for hit in passing:
        if len(references) >= wanted:
            break
        try:
            references.append(Reference(hit, load_reference(runtime, hit, settings)))
        except MmragError as exc:
            notes.append(f"reference {hit.chunk.id} skipped: {exc}")

    # 3. The mode.
    note: str | None = None
    mode = asked if asked != "auto" else ("ip-adapter" if generator.has_ip_adapter else "img2img")
    if not references or mode == "text":
        if mode != "text":
            why = ("no reference image was retrieved" if not hits else
                   "no reference image passed the threshold" if not passing else
                   "no references were asked for (references = 0)" if wanted == 0 else
                   "no reference image could be read")
            note = f"{why}: the image follows the prompt alone (text mode)"
            notes.append(note)
        mode = "text"
        references = []
    elif mode == "ip-adapter":
        error = generator.ip_adapter_error()
        if error is not None:
            if asked == "ip-adapter":
                raise error
            note = f"IP-Adapter unavailable ({error}); guided by the best reference through img2img"
            notes.append(note)
            mode = "img2img"
    if mode == "img2img":
        references = references[:1]

    # 4. The image prompt, enriched from the grounding within the text encoder's limit.
    passages = list(grounding.text_hits) if (grounding is not None and grounding.grounded) else []
    if settings.enrich:
        enriched, enrichment = enrich_prompt(prompt, [r.hit for r in references], passages[:settings.max_facts],
                                             generator.count_tokens, generator.max_tokens)
    else:
        enriched, enrichment = enrich_prompt(prompt, [], [], generator.count_tokens, generator.max_tokens)

    # 5. Denoise.
    image, timings, parameters = generator.run(
        mode, enriched, [r.image for r in references], seed=seed, steps=steps, width=settings.width,
        height=settings.height, guidance_scale=settings.guidance_scale, strength=settings.strength,
        ip_adapter_scale=settings.ip_adapter_scale, negative_prompt=settings.negative_prompt,
        progress=request.progress)

    # 6. Write the PNG with its provenance.
    ref_ids = tuple(r.hit.chunk.id for r in references)
    out_dir = Path(request.out_dir or settings.out_dir or runtime.settings.data_dir / "images").expanduser()
    key = json.dumps([prompt, enriched, seed, generator.name, mode, ref_ids, parameters], sort_keys=True)
    path = out_dir / _file_name(prompt, key, mode, seed)
    record = GeneratedImage(path=str(path.resolve()), mode=mode,  # type: ignore[arg-type]
                            references=ref_ids, seed=seed,
                            prompt=prompt, enriched_prompt=enriched, enrichment=enrichment, model=generator.name,
                            parameters=parameters, note=note, timings=timings)
    try:
        save_png(image, path, record)
    except OSError as exc:
        raise BadInputError(f"cannot write the image to {path}: {exc.strerror or exc}") from exc
    return ImageOutcome(images=(record,), notes=tuple(notes))


__all__ = ["GeneratedImage", "ImageGenerator", "ImageOutcome", "ImageRequest", "Enrichment", "MODES",
           "enrich_prompt", "generate_images", "image_subject", "load_image_generator", "read_provenance"]
