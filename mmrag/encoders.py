"""Encoders: a sentence-transformers text embedder and an open_clip image/text encoder.

Both return L2-normalised float32 numpy arrays, so Milvus' COSINE and IP metrics agree. Precision follows the
hardware (``mmrag.device.pick_dtype``) unless the profile fixes it. Models are built by the ``load_*`` functions,
called by ``mmrag.models.ModelSet`` on first use; the classes also accept pre-built models (tests, benchmarks).
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

from mmrag.errors import BadInputError, ModelUnavailableError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from mmrag.config import ModelSpec, RuntimeSection
    from mmrag.models import Resolution

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSignature:
    """What filled a vector field; a collection records it and refuses to mix encoders."""

    model: str
    dim: int

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dim": self.dim}


@runtime_checkable
class TextEmbedder(Protocol):
    signature: EncoderSignature
    max_tokens: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


def _normalise(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


class SentenceTransformerEmbedder:
    """Text embedder over a ``sentence_transformers.SentenceTransformer``."""

    def __init__(self, model: Any, name: str, batch_size: int = 32) -> None:
        self.model = model
        self.batch_size = batch_size
        dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else (
            model.get_sentence_embedding_dimension())
        self.signature = EncoderSignature(name, int(dim))
        self.max_tokens = int(model.max_seq_length or 256)
        self.tokenizer = model.tokenizer

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.signature.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return _normalise(vectors)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        return self.tokenizer(text, add_special_tokens=False, truncation=False,
                              return_offsets_mapping=True)["offset_mapping"]

    def split_tokens(self, text: str, max_tokens: int, overlap: int) -> list[str]:
        """Cut text into windows of at most ``max_tokens`` tokens, consecutive windows sharing ``overlap``."""
        offsets = self._offsets(text)
        if len(offsets) <= max_tokens:
            return [text]
        step = max(1, max_tokens - overlap)
        pieces = []
        for start in range(0, len(offsets), step):
            window = offsets[start:start + max_tokens]
            pieces.append(text[window[0][0]:window[-1][1]].strip())
            if start + max_tokens >= len(offsets):
                break
        return [p for p in pieces if p]

    def tail(self, text: str, tokens: int) -> str:
        """The last ``tokens`` tokens of a text (the overlap carried into the next chunk)."""
        offsets = self._offsets(text)
        if len(offsets) <= tokens:
            return text
        return text[offsets[-tokens][0]:].strip()


class _ReducingResize:
    """torchvision's ``Resize(size)`` of a Pillow image, with Pillow's ``reducing_gap``.

    The same output size and the same bicubic (or other) filter. A large image (shorter side at least
    ``MIN_REDUCED_SIDE`` px) at least ``2 * REDUCING_GAP`` times the target size is first shrunk by an integer
    factor with a box filter (``Image.reduce``), which costs a fraction of filtering every source pixel, and the
    filter then covers the last factor of ``REDUCING_GAP`` or more. Every other image gives exactly what
    torchvision gives. With 3.0, Pillow's documented "indistinguishable from fair resampling in most cases", the
    CLIP vectors of large images stay at cosine >= 0.999 to those of the exact transform, and their pixels within
    one grey level on average (tests/test_image_preprocess.py)."""

    REDUCING_GAP = 3.0
    MIN_REDUCED_SIDE = 1024

    def __init__(self, resize: Any) -> None:
        self.resize = resize
        self.size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        self.filter = _pil_filter(resize.interpolation)

    @classmethod
    def wrap(cls, step: Any) -> Any:
        """``step`` itself unless it is a plain torchvision ``Resize`` of the shorter side (no max_size)."""
        if type(step).__name__ != "Resize" or getattr(step, "max_size", None) is not None:
            return step
        size = getattr(step, "size", None)
        if not (isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1)):
            return step
        if _pil_filter(getattr(step, "interpolation", None)) is None:
            return step
        return cls(step)

    def __call__(self, image: Any) -> Any:
        from PIL import Image

        if not isinstance(image, Image.Image):
            return self.resize(image)
        from torchvision.transforms.functional import _compute_resized_output_size

        width, height = image.size
        new_height, new_width = _compute_resized_output_size((height, width), self.size)
        if (new_width, new_height) == (width, height):
            return image
        gap = self.REDUCING_GAP if min(width, height) >= self.MIN_REDUCED_SIDE else None
        return image.resize((new_width, new_height), self.filter, reducing_gap=gap)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resize!r}, reducing_gap={self.REDUCING_GAP})"


def _pil_filter(interpolation: Any) -> int | None:
    """The Pillow filter for a torchvision ``InterpolationMode`` (None for one Pillow lacks)."""
    from PIL import Image

    name = getattr(interpolation, "value", None)
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
            "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}.get(str(name))


class ClipEncoder:
    """open_clip model: images and texts into one space, so text finds images and images find text."""

    # Texts per forward pass of the text tower. Texts are short (at most 77 tokens), so a batch of 64 holds little
    # memory; on 2 bf16 cores 64 ran 1.2-1.7x the speed of 32 over 256 HaluEval passages (128 and 256 no faster).
    TEXT_BATCH = 64

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, name: str, *, device: str = "cpu",
                 dtype: "torch.dtype | None" = None, batch_size: int = 32, text_batch_size: int | None = None) -> None:
        import torch

        self.device = device
        self.dtype = dtype or torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # images per forward pass (encode_images)
        self.text_batch_size = text_batch_size or max(batch_size, self.TEXT_BATCH)
        dim = getattr(getattr(model, "visual", None), "output_dim", None)
        if dim is None:
            dim = int(model.text_projection.shape[1])
        self.signature = EncoderSignature(name, int(dim))
        size = getattr(getattr(model, "visual", None), "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._pil_head, self._mean, self._std = self._split_preprocess(preprocess)

    @staticmethod
    def _split_preprocess(preprocess: Any) -> tuple[Any, "torch.Tensor | None", "torch.Tensor | None"]:
        """Split the model's transform into its Pillow part and its final to-tensor + normalize.

        Preprocessing then ends at a uint8 tensor and the normalization runs once per batch in the encoding
        thread: preparing threads run no torch ops (each thread calling torch ops would start its own team of
        intra-op threads, which then compete with the model's forward pass), and queued images take 4x less
        memory. Transforms of another shape keep the model's own transform whole."""
        import torch

        steps = list(getattr(preprocess, "transforms", []))
        if len(steps) < 2 or type(steps[-1]).__name__ != "Normalize" or type(steps[-2]).__name__ not in (
                "ToTensor", "MaybeToTensor"):
            return None, None, None
        from torchvision.transforms import Compose

        normalize = steps[-1]
        mean = torch.tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        head = [_ReducingResize.wrap(step) for step in steps[:-2]]
        return Compose(head), mean, std

    def load_image(self, data: bytes) -> "Image.Image":
        """Decode image bytes to RGB, at reduced size when the format allows it (JPEG draft mode)."""
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(data))
            if image.format == "JPEG":
                image.draft("RGB", (self.image_size, self.image_size))
            return self.to_rgb(image)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input
            raise BadInputError(f"unreadable image: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def to_rgb(image: "Image.Image") -> "Image.Image":
        """RGB with transparency flattened onto white (a transparent background is not black)."""
        from PIL import Image

        if image.mode in ("RGBA", "LA", "P", "PA"):
            if image.mode != "RGBA":
                image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")

    def _preprocess_rgb(self, image: "Image.Image") -> "torch.Tensor":
        if self._pil_head is None:
            return self.preprocess(image)
        import torch

        array = np.array(self._pil_head(image), dtype=np.uint8)  # H x W x C, Pillow only
        return torch.from_numpy(array).permute(2, 0, 1)

    def preprocess_bytes(self, data: bytes) -> "torch.Tensor":
        """An image ready for ``encode_image_tensors`` (uint8 before normalization where the transform allows)."""
        return self._preprocess_rgb(self.load_image(data))

    def preprocess_image(self, image: "Image.Image") -> "torch.Tensor":
        """Preprocess an already decoded image (skips a second decode)."""
        try:
            return self._preprocess_rgb(self.to_rgb(image))
        except Exception as exc:  # noqa: BLE001
            raise BadInputError(f"unreadable image: {type(exc).__name__}: {exc}") from exc

    def encode_image_tensors(self, batch: "torch.Tensor") -> np.ndarray:
        import torch

        if batch.dtype == torch.uint8:  # finish the model's transform: to [0, 1], then normalize (in place)
            batch = batch.float().sub_(self._mean).div_(self._std)
        with torch.inference_mode():
            features = self.model.encode_image(batch.to(device=self.device, dtype=self.dtype))
        return _normalise(features.float().cpu().numpy())

    def encode_images(self, images: Sequence[bytes]) -> np.ndarray:
        import torch

        out = [np.zeros((0, self.signature.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess_bytes(b) for b in images[start:start + self.batch_size]])
            out.append(self.encode_image_tensors(batch))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for texts, in input order.

        CLIP pads every text to its 77-token context, yet most texts here are far shorter (an image's context is
        often a few words). Where the text tower is causal and pools at the end-of-text token, no position after
        that token can change the pooled vector, so each batch runs only up to its longest text (texts sorted by
        length, so batches hold similar lengths). Other text towers run whole."""
        import torch

        out = np.zeros((len(texts), self.signature.dim), dtype=np.float32)
        if not texts:
            return out
        tokens = self.tokenizer(list(texts))
        lengths = self._text_lengths(tokens)
        order = np.argsort(lengths.numpy(), kind="stable") if lengths is not None else np.arange(len(texts))
        for start in range(0, len(texts), self.text_batch_size):
            rows = torch.from_numpy(order[start:start + self.text_batch_size])
            batch = tokens[rows]
            with torch.inference_mode():
                if lengths is None:
                    features = self.model.encode_text(batch.to(self.device))
                else:
                    features = self._encode_text_prefix(batch[:, :int(lengths[rows].max())].to(self.device))
            out[rows.numpy()] = _normalise(features.float().cpu().numpy())
        return out

    def _text_lengths(self, tokens: "torch.Tensor") -> "torch.Tensor | None":
        """Per text, the positions up to and including its end-of-text token; None where a prefix is not exact."""
        model = self.model
        pool = getattr(model, "text_pool_type", None)
        if not self._causal_text or tokens.ndim != 2:
            return None
        if pool == "argmax":
            end = tokens.argmax(dim=-1)
        else:
            eos = getattr(model, "text_eos_id", None)
            if eos is None:
                return None
            end = (tokens == eos).int().argmax(dim=-1)
        return end + 1

    @functools.cached_property
    def _causal_text(self) -> bool:
        """Whether the text tower is open_clip's ``CLIP`` text transformer with a causal mask and end-token pooling."""
        import torch

        model = self.model
        mask = getattr(model, "attn_mask", None)
        if (mask is None or getattr(model, "text_pool_type", None) not in ("argmax", "eos")
                or not hasattr(model, "token_embedding") or getattr(model, "text_projection", None) is None
                or mask.ndim != 2 or mask.shape[0] != mask.shape[1]):
            return False
        causal = torch.triu(torch.ones(mask.shape, dtype=torch.bool), diagonal=1)
        return bool(torch.equal(torch.isinf(mask.cpu()) & (mask.cpu() < 0), causal))

    def _encode_text_prefix(self, tokens: "torch.Tensor") -> "torch.Tensor":
        """open_clip's ``CLIP.encode_text`` over the first ``tokens.shape[1]`` positions only."""
        import torch
        from open_clip.transformer import text_global_pool

        model = self.model
        length = tokens.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast)
        x = x + model.positional_embedding[:length].to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection


def load_text_embedder(resolution: "Resolution", spec: "ModelSpec", runtime: "RuntimeSection") -> SentenceTransformerEmbedder:
    from mmrag.device import configure_threads, pick_device, pick_dtype

    configure_threads(runtime.torch_threads)
    device = pick_device(runtime.device)
    try:
        from mmrag.compat import ensure_torchvision

        ensure_torchvision()
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(resolution.location, device=device,
                                    local_files_only=resolution.source != "hub")
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailableError(
            f"cannot load the text embedder from {resolution.location}: {type(exc).__name__}: {exc}. "
            f"{resolution.note}") from exc
    dtype = pick_dtype(spec.precision, device)
    model = model.to(dtype)
    name = spec.name or Path(resolution.location).name
    logger.info("text embedder %s loaded from %s (%s, %s)", name, resolution.location, device, dtype)
    return SentenceTransformerEmbedder(model, name, batch_size=spec.batch_size)


def load_clip(resolution: "Resolution", spec: "ModelSpec", runtime: "RuntimeSection") -> ClipEncoder:
    from mmrag.compat import ensure_torchvision
    from mmrag.device import configure_threads, pick_device, pick_dtype

    configure_threads(runtime.torch_threads)
    ensure_torchvision()
    import open_clip

    device = pick_device(runtime.device)
    arch = spec.name or "ViT-B-32"
    try:
        if resolution.source == "path" and Path(resolution.location).is_dir():
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{resolution.location}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{resolution.location}")
        else:
            pretrained = resolution.location if resolution.source == "path" else spec.pretrained
            if resolution.source == "hub-cache":
                pretrained = spec.pretrained
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(arch)
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailableError(
            f"cannot load CLIP {arch} ({spec.pretrained or resolution.location}): {type(exc).__name__}: {exc}. "
            f"{resolution.note}") from exc
    dtype = pick_dtype(spec.precision, device)
    if resolution.source == "path":  # the weights identify the encoder: name it by its folder or file
        name = f"{spec.name or 'open_clip'}@{Path(resolution.location).name}"
    else:
        name = f"{arch}/{spec.pretrained}"
    logger.info("CLIP %s loaded (%s, %s)", name, device, dtype)
    return ClipEncoder(model, preprocess, tokenizer, name, device=device, dtype=dtype, batch_size=spec.batch_size)


def load_cross_encoder(resolution: "Resolution", spec: "ModelSpec", runtime: "RuntimeSection") -> Any:
    """A sentence-transformers ``CrossEncoder`` (e.g. ms-marco-MiniLM) scoring (query, passage) pairs."""
    from mmrag.device import configure_threads, pick_device, pick_dtype

    configure_threads(runtime.torch_threads)
    device = pick_device(runtime.device)
    try:
        from mmrag.compat import ensure_torchvision

        ensure_torchvision()
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(resolution.location, device=device, local_files_only=resolution.source != "hub")
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailableError(f"cannot load the reranker from {resolution.location}: {type(exc).__name__}: "
                                    f"{exc}. {resolution.note}") from exc
    model.model.to(pick_dtype(spec.precision, device))
    logger.info("reranker loaded from %s (%s)", resolution.location, device)
    return model
