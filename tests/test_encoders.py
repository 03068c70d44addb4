"""Encoders: precision follows the hardware and stays faithful to fp32; text and images share one space."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmrag.device import cpu_has_bf16, pick_dtype
from mmrag.errors import BadInputError

from conftest import build_clip


def _images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        array = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_precision_follows_the_hardware():
    import torch

    assert pick_dtype("auto", "cuda") == torch.float16
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert pick_dtype("fp32", "cpu") == torch.float32


@pytest.mark.slow
def test_reduced_precision_clip_vectors_match_fp32():
    """ViT-B-32 (random weights, the real architecture) in the auto precision against fp32: cosine >= 0.999."""
    fast = build_clip("ViT-B-32", precision="bf16")
    exact = build_clip("ViT-B-32", precision="fp32")
    images = _images(4)
    cos = np.sum(fast.encode_images(images) * exact.encode_images(images), axis=1)
    assert cos.min() >= 0.999, cos
    texts = ["a red vintage car from the 1960s", "a chrome bumper with overriders"]
    cos = np.sum(fast.encode_texts(texts) * exact.encode_texts(texts), axis=1)
    assert cos.min() >= 0.999, cos


def test_reduced_precision_text_vectors_match_fp32(shared):
    import json

    from mmrag.config import load_settings
    from mmrag.models import ModelSet

    passages = [json.loads(line)["knowledge"] for line in (shared / "halueval" / "qa_dev.jsonl").open()][:64]
    fast = ModelSet(load_settings(models={"text_embedder": {"precision": "bf16"}})).text_embedder
    exact = ModelSet(load_settings(models={"text_embedder": {"precision": "fp32"}})).text_embedder
    cos = np.sum(fast.encode(passages) * exact.encode(passages), axis=1)
    assert cos.min() >= 0.999, cos.min()


def test_clip_vectors_are_normalised_and_batched(tiny_clip):
    images = _images(5)
    one_by_one = np.concatenate([tiny_clip.encode_images([b]) for b in images])
    batched = tiny_clip.encode_images(images)
    assert batched.shape == (5, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_split_preprocessing_equals_the_models_own_transform(tiny_clip):
    """The uint8 fast path (Pillow steps in the preparing thread, normalization per batch) must give what the
    model's own transform gives, for every kind of image."""
    import torch

    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((90, 120, 3)) * 255).astype(np.uint8)),
              Image.fromarray((rng.random((300, 200, 4)) * 255).astype(np.uint8), "RGBA"),
              Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8), "L"),
              Image.fromarray((rng.random((50, 80, 3)) * 255).astype(np.uint8)).convert("P")]
    fast = torch.stack([tiny_clip.preprocess_image(image) for image in images])
    assert fast.dtype == torch.uint8
    reference = torch.stack([tiny_clip.preprocess(tiny_clip.to_rgb(image)) for image in images])
    normalised = (fast.float() - tiny_clip._mean) / tiny_clip._std
    assert torch.allclose(normalised, reference, atol=1e-5)
    np.testing.assert_allclose(tiny_clip.encode_image_tensors(fast), tiny_clip.encode_image_tensors(reference),
                               atol=1e-5)


def test_clip_text_vectors_equal_the_full_context_pass_in_input_order(tiny_clip):
    """Texts run only up to their batch's longest text; the vectors must equal the 77-position pass, row for row."""
    import torch

    texts = ["peacock", "a red vintage car from the 1960s with chrome bumpers", "word " * 120, "", "ship", "a b c"]
    texts = texts * 7  # more than one batch, lengths interleaved so sorting reorders them
    batch, tiny_clip.text_batch_size = tiny_clip.text_batch_size, 8
    try:
        fast = tiny_clip.encode_texts(texts)
    finally:
        tiny_clip.text_batch_size = batch
    assert tiny_clip._causal_text
    with torch.inference_mode():
        full = torch.nn.functional.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(texts)).float(), dim=-1)
    np.testing.assert_allclose(fast, full.numpy(), atol=1e-5)
    assert tiny_clip.encode_texts([]).shape == (0, tiny_clip.signature.dim)


def test_unreadable_image_is_a_bad_input(tiny_clip):
    with pytest.raises(BadInputError, match="unreadable image"):
        tiny_clip.encode_images([b"\x89PNG\r\n\x1a\n broken"])


def test_text_embedder_is_real_minilm(text_embedder):
    vectors = text_embedder.encode(["A dog runs in the park.", "A puppy plays outside.", "Stock prices fell."])
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2  # real weights: meaning, not noise
    assert text_embedder.signature.model == "sentence-transformers/all-MiniLM-L6-v2"
