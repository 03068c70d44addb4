"""Image faithfulness metrics for evaluation runs, computed with the project's CLIP encoder (``mmrag.encoders``).

- ``clip_score(encoder, images, texts)``: CLIPScore of each image against its prompt, ``max(100 * cos, 0)`` (the
  torchmetrics convention; Hessel et al. 2021 scale by 2.5 instead of 100). Higher: the picture shows the prompt.
- ``clip_i(encoder, images, references)``: CLIP-I, the cosine between each image and each of its reference images,
  in [-1, 1]. Higher: the picture follows its references.

An image is a PIL image, encoded bytes or a path. Numbers from a random-weight CLIP (tests) are arbitrary; only a
CLIP with real weights gives meaningful values.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from mmrag.errors import BadInputError

if TYPE_CHECKING:
    from PIL import Image

    from mmrag.encoders import ClipEncoder

ImageLike = Union["Image.Image", bytes, str, Path]


def _as_image(item: ImageLike) -> "Image.Image":
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    try:
        if isinstance(item, (bytes, bytearray)):
            image = Image.open(io.BytesIO(item))
        elif isinstance(item, (str, Path)):
            image = Image.open(item)
        else:
            raise TypeError(f"expected a PIL image, bytes or a path, got {type(item).__name__}")
        image.load()
        return image
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input
        name = str(item) if isinstance(item, (str, Path)) else f"{len(item)} bytes" if isinstance(
            item, (bytes, bytearray)) else type(item).__name__
        raise BadInputError(f"cannot read image ({name}): {type(exc).__name__}: {exc}") from exc


def encode_images(encoder: "ClipEncoder", images: Sequence[ImageLike]) -> np.ndarray:
    """L2-normalised CLIP vectors of images given as PIL images, bytes or paths."""
    import torch

    if not images:
        return np.zeros((0, encoder.signature.dim), dtype=np.float32)
    out = []
    for start in range(0, len(images), encoder.batch_size):
        batch = torch.stack([encoder.preprocess_image(_as_image(item))
                             for item in images[start:start + encoder.batch_size]])
        out.append(encoder.encode_image_tensors(batch))
    return np.concatenate(out)


def clip_score(encoder: "ClipEncoder", images: Sequence[ImageLike], texts: Sequence[str]) -> list[float]:
    """CLIPScore of each image against the text at the same position: ``max(100 * cosine, 0)``."""
    if len(images) != len(texts):
        raise BadInputError(f"clip_score needs one text per image: {len(images)} images, {len(texts)} texts")
    if not images:
        return []
    image_vectors = encode_images(encoder, images)
    text_vectors = encoder.encode_texts(list(texts))
    cosines = np.sum(image_vectors * text_vectors, axis=1)
    return [float(max(100.0 * c, 0.0)) for c in cosines]


def clip_i(encoder: "ClipEncoder", images: Sequence[ImageLike],
           references: Sequence[Sequence[ImageLike]]) -> list[list[float]]:
    """CLIP-I: for each image, its cosine to each of its references (an empty list for an image without any)."""
    if len(images) != len(references):
        raise BadInputError(f"clip_i needs one reference list per image: {len(images)} images, "
                            f"{len(references)} reference lists")
    if not images:
        return []
    image_vectors = encode_images(encoder, images)
    flat = [ref for refs in references for ref in refs]
    ref_vectors = encode_images(encoder, flat)
    out: list[list[float]] = []
    at = 0
    for vector, refs in zip(image_vectors, references):
        block = ref_vectors[at:at + len(refs)]
        at += len(refs)
        out.append([float(c) for c in block @ vector])
    return out


__all__ = ["clip_i", "clip_score", "encode_images"]
