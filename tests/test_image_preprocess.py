"""The image ingest path: the CLIP preprocessing shortcuts keep the model's own transform (exactly where they can,
within cosine 0.999 where they approximate it), and images embedded in the preparing lanes are stored with the
vectors the plain encoder gives, leaving torch's thread settings as they were."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag.errors import BadInputError

# A small vision tower at CLIP's real input size (224 px), so the resize and crop are those of ViT-B-32.
CLIP_224 = "mmrag-test-clip-224"
CLIP_224_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip224(tmp_path_factory):
    from conftest import build_clip

    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    if CLIP_224 not in open_clip.list_models():
        folder = tmp_path_factory.mktemp("clip-224-config")
        (folder / f"{CLIP_224}.json").write_text(json.dumps(CLIP_224_CONFIG))
        open_clip.add_model_config(folder)
    return build_clip(CLIP_224)


@pytest.fixture(scope="module")
def tuxpaint(shared) -> list[Path]:
    return sorted((shared / "tuxpaint" / "images").glob("*.png"))


def _exact(clip, image: Image.Image):
    """The model's own transform, whole (open_clip's Resize, CenterCrop, ToTensor, Normalize)."""
    import torch

    return torch.stack([clip.preprocess(clip.to_rgb(image))])


def _exact_pixels(clip, image: Image.Image) -> np.ndarray:
    """The model's own transform up to its to-tensor step: uint8 H x W x C."""
    from torchvision.transforms import Compose

    return np.array(Compose(clip.preprocess.transforms[:-2])(clip.to_rgb(image)), dtype=np.uint8)


def _vector(clip, batch) -> np.ndarray:
    return clip.encode_image_tensors(batch)[0]


def _large_photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A large image with structure at every scale: gradients, shapes and fine texture."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (np.sin(x / 37.0) * np.cos(y / 23.0) + 1) * 127], axis=-1)
    base += rng.normal(0, 18, base.shape)  # fine texture, which the box pre-reduction averages differently
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(width // 40, width // 6))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def test_small_images_get_exactly_the_models_transform(clip224, tuxpaint):
    """Below the reducing gap (every tuxpaint image at 224 px) the uint8 preprocessing is the model's own
    transform to the last bit, and normalised per batch it matches the model's float transform."""
    import torch

    from ingest.safety import check_image

    for path in tuxpaint:
        image = check_image(path.read_bytes(), 10**8).image
        ours = clip224.preprocess_image(image)
        assert ours.dtype == torch.uint8 and tuple(ours.shape) == (3, 224, 224)
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), _exact_pixels(clip224, image)), path.name
        normalised = ours.unsqueeze(0).float().sub_(clip224._mean).div_(clip224._std)
        torch.testing.assert_close(normalised, _exact(clip224, image), rtol=0, atol=1e-5)


def _crude(image: Image.Image, size: int):
    """A cruder preprocessing (nearest neighbour, no antialiasing) for the control: uint8 1 x C x H x W."""
    import torch

    width, height = image.size
    scale = size / min(width, height)
    resized = image.convert("RGB").resize((max(size, round(width * scale)), max(size, round(height * scale))),
                                          Image.NEAREST)
    left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
    cropped = np.array(resized.crop((left, top, left + size, top + size)))
    return torch.from_numpy(cropped).permute(2, 0, 1).unsqueeze(0)


def test_reduced_resize_keeps_vectors_within_tolerance(clip224, tiny_clip, tuxpaint):
    """Large images are box-reduced before the bicubic filter: photo-like images and tuxpaint images enlarged 6x,
    at 224 px, and the photo-like images at the tiny model's 32 px, stay at cosine >= 0.999 to the exact
    transform's vectors (also once the vectors' common part is taken out, which random weights make large) and
    within one grey level per pixel on average, where a cruder resize (nearest neighbour) of the same images is
    not: the check can fail."""
    from mmrag.encoders import _ReducingResize

    photos = [_large_photo_like(3000, 2000), _large_photo_like(1400, 4200, seed=1),
              _large_photo_like(2600, 2600, seed=3)]
    enlarged = []
    for path in tuxpaint:
        image = Image.open(path)
        if min(image.size) >= 200 and len(enlarged) < 8:
            enlarged.append(image.resize((image.size[0] * 6, image.size[1] * 6), Image.LANCZOS))
    cases = [(clip224, image) for image in photos + enlarged] + [(tiny_clip, image) for image in photos]
    reduced = 0
    exact, ours = {}, {}
    for i, (clip, image) in enumerate(cases):
        pixels = clip.preprocess_image(image)
        error = np.abs(pixels.permute(1, 2, 0).numpy().astype(np.float32) - _exact_pixels(clip, image)).mean()
        assert error < 1.0, (clip.image_size, image.size, error)
        exact[i] = _vector(clip, _exact(clip, image))
        ours[i] = _vector(clip, pixels.unsqueeze(0))
        assert float(ours[i] @ exact[i]) >= 0.999, (clip.image_size, image.size)
        reduced += (min(image.size) >= max(_ReducingResize.MIN_REDUCED_SIDE,
                                           2 * _ReducingResize.REDUCING_GAP * clip.image_size))
    assert len(enlarged) == 8 and reduced == len(cases)  # the approximation was exercised on every case

    mean = np.mean([exact[i] for i in range(len(photos))], axis=0)

    def centred(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - mean, b - mean
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for i, photo in enumerate(photos):
        assert centred(ours[i], exact[i]) >= 0.999
        crude = _crude(photo, 224)
        assert centred(_vector(clip224, crude), exact[i]) < 0.999
        assert np.abs(crude[0].permute(1, 2, 0).numpy().astype(np.float32) - _exact_pixels(clip224, photo)).mean() > 3


def test_large_jpeg_decoded_at_reduced_size_stays_within_tolerance(clip224):
    """A large JPEG from bytes is decoded at reduced size (draft mode) and still matches the exact transform of
    the full decode (within two grey levels per pixel on average; nearest neighbour is off by 7 to 12)."""
    buffer = io.BytesIO()
    _large_photo_like(2400, 1800, seed=2).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    full = Image.open(io.BytesIO(data)).convert("RGB")
    assert clip224.load_image(data).size[0] < full.size[0]  # really decoded smaller
    pixels = clip224.preprocess_bytes(data)
    assert np.abs(pixels.permute(1, 2, 0).numpy().astype(np.float32) - _exact_pixels(clip224, full)).mean() < 2.0
    ours = _vector(clip224, pixels.unsqueeze(0))
    assert float(ours @ _vector(clip224, _exact(clip224, full))) >= 0.999


def test_transparency_is_flattened_onto_white(clip224):
    """RGBA (no copy to RGBA first), palette with transparency, and LA images all come out on a white
    background, as the model's transform of the flattened image."""
    rgba = Image.new("RGBA", (300, 260), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (100, 80, 200, 180))
    palette = rgba.convert("P")
    palette.info["transparency"] = 0
    la = rgba.convert("LA")
    for image in (rgba, palette, la):
        pixels = clip224.preprocess_image(image)
        assert tuple(int(v) for v in pixels[:, 0, 0]) == (255, 255, 255), image.mode  # transparent corner
        assert tuple(int(v) for v in pixels[:, 112, 112]) != (255, 255, 255), image.mode  # the opaque square
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), _exact_pixels(clip224, image)), image.mode


def test_unreadable_bytes_are_a_bad_input(clip224):
    with pytest.raises(BadInputError, match="unreadable image"):
        clip224.preprocess_bytes(b"\xff\xd8\xff\xe0 not a jpeg")


def _rows(runtime) -> dict[str, dict]:
    return {r["source"]: r for r in runtime.index.chunk_rows("", ["source", "modality", "clip_vector", "text"])}


@pytest.mark.slow  # the real MiniLM (make_runtime)
def test_images_embedded_in_lanes_store_the_encoders_vectors(make_runtime, tiny_clip, tuxpaint, tmp_path):
    """Many slices of images and text files, one broken image among them: every good image is stored with the
    vector ``encode_images`` gives for its bytes, the broken one fails alone, the lanes (not the batch writes)
    embedded the images, and torch's thread count is what it was, also for threads started afterwards."""
    import torch

    folder = tmp_path / "kb"
    folder.mkdir()
    chosen = tuxpaint[:37]
    for path in chosen:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("Tux the penguin paints pictures of animals.\n")
    (folder / "zz-broken.png").write_bytes(chosen[0].read_bytes()[:400])  # truncated PNG
    threads_before = torch.get_num_threads()

    runtime = make_runtime(ingest={"image_batch": 8})
    report = runtime.ingestor.ingest([folder])

    assert report.added == len(chosen) + 1
    assert [f.source for f in report.failed] == [str(folder / "zz-broken.png")]
    assert report.chunks["image"] == len(chosen)
    lanes = runtime.ingestor.lane_timings
    assert lanes.get("clip_image", 0) > 0 and lanes.get("prepare", 0) > 0
    assert runtime.ingestor.timings.get("clip_image", 0.0) < lanes["clip_image"]
    rows = _rows(runtime)
    for path in chosen:
        row = rows[str(folder / path.name)]
        assert row["modality"] == "image"
        expected = tiny_clip.encode_images([path.read_bytes()])[0]
        assert float(np.asarray(row["clip_vector"], dtype=np.float32) @ expected) > 0.9999, path.name
    assert rows[str(folder / "notes.txt")]["modality"] == "text"

    assert torch.get_num_threads() == threads_before
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [threads_before]
