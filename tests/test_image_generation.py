"""Reference-guided image generation end to end on tiny random diffusers pipelines built from configs.

No diffusion, IP-Adapter or CLIP weights exist offline, so the pipeline (UNet, VAE, CLIP text encoder with a
tokenizer built from open_clip's BPE vocabulary), a tiny AutoencoderTiny and a tiny IP-Adapter whose layers match
the tiny UNet (with its CLIP image encoder, in the h94/IP-Adapter file layout) are saved to folders and loaded
through the product's own loading code (``models.image_generator.path``, ``options.ip_adapter``). References are
real: the sample knowledge base's pictures, ingested into milvus-lite and retrieved through their context text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SAMPLE_KB = Path(__file__).resolve().parents[1] / "mmrag" / "sample_kb"
EXCLUDE = [".*", "images/*", "LICENSE.md", "*.py"]
MUSTANG = "an image of a red 1964 Ford Mustang coupe, and describe its key features"
UNRELATED = "a bowl of ramen soup with chopsticks"
from tests.tinydiffusion import SIZE, image_settings


@pytest.fixture(scope="module")
def kb_data(tmp_path_factory, text_embedder) -> Path:
    """The sample knowledge base ingested once into milvus-lite (no CLIP weights: images are found through their
    context text, with the real MiniLM)."""
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    root = tmp_path_factory.mktemp("image-kb")
    shutil.copytree(SAMPLE_KB, root / "kb")
    settings = load_settings(data_dir=root / "data", ingest={"exclude": EXCLUDE})
    with Runtime(settings, ModelSet(settings, text_embedder=text_embedder)) as runtime:
        report = runtime.ingestor.ingest([root / "kb"])
    assert report.ok and report.chunks["image"] == 5
    return root / "data"


@pytest.fixture(scope="module")
def shared_generator(tiny_sd):
    """The default test configuration (tiny pipeline, matching IP-Adapter, full VAE) loaded once through the
    product's loader, for tests that are not about loading."""
    from generation.image import load_image_generator
    from mmrag.config import load_settings
    from mmrag.models import resolve

    settings = load_settings(**image_settings(tiny_sd))
    spec = settings.models.image_generator
    return load_image_generator(resolve("image_generator", spec).require(), spec, settings.runtime)


@pytest.fixture
def kb_runtime(kb_data, tiny_sd, text_embedder):
    """``kb_runtime(generator=None, **overrides)``: a runtime over the ingested sample knowledge base with the
    test image configuration (overrides replace sections); without ``generator`` the model loads from the
    configuration, as in the product."""
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    made = []

    def make(generator=None, **overrides):
        settings = load_settings(data_dir=kb_data, ingest={"exclude": EXCLUDE},
                                 **(image_settings(tiny_sd) | overrides))
        runtime = Runtime(settings, ModelSet(settings, text_embedder=text_embedder, image_generator=generator))
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


def _grounding(runtime, prompt: str, k_image: int = 3):
    from retrieval.retriever import Query, Retriever

    return Retriever(runtime).retrieve(Query(text=prompt, k_text=3, k_image=k_image))


def _pixels(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _generate(runtime, prompt, tmp_path, **request):
    from generation.image import ImageRequest, generate_images

    request.setdefault("out_dir", tmp_path / "out")
    return generate_images(runtime, prompt, _grounding(runtime, prompt), ImageRequest(**request))


# ---------------------------------------------------------------------------------------------------------------
# Every mode, end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ip-adapter", "img2img", "text"])
def test_every_mode_from_retrieved_references_to_png_with_provenance(kb_runtime, shared_generator, tmp_path, mode):
    from generation.image import read_provenance, reference_passes

    runtime = kb_runtime(shared_generator)
    grounding = _grounding(runtime, MUSTANG)
    passing = [h for h in grounding.image_hits if reference_passes(h, runtime.settings.image)]
    assert passing and "Mustang" in passing[0].chunk.context  # the real retrieval found the right picture first
    outcome = _generate(runtime, MUSTANG, tmp_path, mode=mode, references=2, seed=11)
    assert outcome.error is None, outcome.error
    [image] = outcome.images
    expected = {"ip-adapter": tuple(h.chunk.id for h in passing[:2]), "img2img": (passing[0].chunk.id,),
                "text": ()}[mode]
    assert image.mode == mode and image.references == expected and image.seed == 11
    # The PNG exists, has the configured size and carries the same provenance as the record.
    path = Path(image.path)
    assert path.is_file() and path.parent == tmp_path / "out"
    assert _pixels(image.path).shape == (SIZE, SIZE, 3)
    stored = read_provenance(path)
    assert stored["mode"] == mode and stored["seed"] == 11 and stored["references"] == list(expected)
    assert stored["prompt"] == MUSTANG and stored["enriched_prompt"] == image.enriched_prompt
    assert stored["model"] == image.model == "sd" and stored["record"] == image.to_json()
    # The image prompt drops the text task, adds grounding, and fits the text encoder.
    generator = runtime.models.image_generator
    assert "describe" not in image.enriched_prompt and image.enriched_prompt.startswith("an image of a red 1964")
    assert generator.count_tokens(image.enriched_prompt) <= generator.max_tokens == 77
    assert image.enrichment and all(e.text in image.enriched_prompt for e in image.enrichment)
    if mode != "text":
        assert image.enrichment[0].kind == "reference" and image.enrichment[0].chunk_id == passing[0].chunk.id
    assert {"passage"} <= {e.kind for e in image.enrichment}
    assert image.timings["unet"] > 0 and image.timings["vae"] > 0 and image.timings["text_encoder"] > 0
    assert (image.timings["image_encoder"] > 0) == (mode == "ip-adapter")


def test_the_profile_role_loads_and_auto_picks_ip_adapter_img2img_or_text(kb_runtime, tiny_sd, tmp_path):
    from mmrag.device import pick_dtype

    from generation.image import reference_passes

    # Loads through ModelSet from models.image_generator.path; a lower threshold lets two references pass.
    runtime = kb_runtime(**image_settings(tiny_sd, precision="auto", reference_threshold=0.1))
    generator = runtime.models.image_generator
    assert type(generator.pipe).__name__ == "StableDiffusionPipeline" and generator.name == "sd"
    passing = [h.chunk.id for h in _grounding(runtime, MUSTANG).image_hits
               if reference_passes(h, runtime.settings.image)]
    auto = _generate(runtime, MUSTANG, tmp_path, seed=1)
    assert auto.error is None and auto.notes == ()
    [image] = auto.images
    assert image.mode == "ip-adapter" and image.references == tuple(passing[:2]) and len(image.references) == 2
    assert image.parameters["dtype"] == str(pick_dtype("auto", "cpu")).replace("torch.", "")
    assert image.parameters["ip_adapter_scale"] == 0.6 and image.parameters["steps"] == 2
    # Nothing in the knowledge base is like the prompt: the picture follows the prompt alone, and says so.
    unrelated = _generate(runtime, UNRELATED, tmp_path, seed=1)
    [image] = unrelated.images
    assert image.mode == "text" and image.references == () and image.enrichment == ()
    assert "no reference image passed the threshold" in image.note and unrelated.notes == (image.note,)
    # No IP-Adapter configured: auto guides the picture from the best reference through img2img.
    plain = kb_runtime(**image_settings(tiny_sd, ip=None))
    [image] = _generate(plain, MUSTANG, tmp_path, seed=1).images
    assert image.mode == "img2img" and len(image.references) == 1 and image.parameters["strength"] == 0.5
    assert image.parameters["scheduled_steps"] == 4  # 2 steps at strength 0.5 run 2 of 4 scheduled steps
    # ... and asking for the ip-adapter mode says what to configure.
    asked = _generate(plain, MUSTANG, tmp_path, mode="ip-adapter", seed=1)
    assert asked.images == () and "options.ip_adapter" in str(asked.error)


def test_seeds_reproduce_and_the_references_steer_the_picture(kb_runtime, shared_generator, tmp_path):
    from PIL import Image

    runtime = kb_runtime(shared_generator)
    first = _generate(runtime, MUSTANG, tmp_path, out_dir=tmp_path / "1", mode="ip-adapter", seed=5).images[0]
    other_mode = _generate(runtime, MUSTANG, tmp_path, out_dir=tmp_path / "2", mode="text", seed=5).images[0]
    again = _generate(runtime, MUSTANG, tmp_path, out_dir=tmp_path / "3", mode="ip-adapter", seed=5).images[0]
    other_seed = _generate(runtime, MUSTANG, tmp_path, out_dir=tmp_path / "4", mode="ip-adapter", seed=6).images[0]
    assert Path(first.path).name == Path(again.path).name  # same inputs, same file name
    assert np.array_equal(_pixels(first.path), _pixels(again.path))  # a text-mode run in between changed nothing
    assert not np.array_equal(_pixels(first.path), _pixels(other_seed.path))
    assert not np.array_equal(_pixels(first.path), _pixels(other_mode.path))
    # Same prompt and seed, other reference pictures: other images, in both guided modes.
    images = SAMPLE_KB / "images"
    mustang = Image.open(images / "mustang-1964.png").convert("RGB")
    beetle = Image.open(images / "vw-beetle.png").convert("RGB")
    args = dict(seed=9, steps=2, width=SIZE, height=SIZE, guidance_scale=0.0, strength=0.6, ip_adapter_scale=1.0)
    for mode in ("ip-adapter", "img2img"):
        a, _, _ = shared_generator.run(mode, "a car", [mustang], **args)
        b, _, _ = shared_generator.run(mode, "a car", [beetle], **args)
        a2, _, _ = shared_generator.run(mode, "a car", [mustang], **args)
        assert np.array_equal(np.asarray(a), np.asarray(a2)) and not np.array_equal(np.asarray(a), np.asarray(b))


def test_tiny_autoencoder_and_precision_from_the_profile(kb_runtime, tiny_sd, tmp_path):
    runtime = kb_runtime(**image_settings(tiny_sd, ip=None, tiny_autoencoder=True, precision="fp32"))
    outcome = _generate(runtime, MUSTANG, tmp_path, seed=2)
    [image] = outcome.images
    pipe = runtime.models.image_generator.pipe
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and image.parameters["autoencoder"] == "tiny:taesd"
    assert image.parameters["dtype"] == "float32" and pipe.unet.dtype == pipe.vae.dtype
    assert image.mode == "img2img" and _pixels(image.path).shape == (SIZE, SIZE, 3)


def test_unavailable_or_wrong_kind_of_model_is_a_clear_error(kb_runtime, tiny_sd, tmp_path):
    from mmrag.errors import ConfigError, ModelUnavailableError

    def outcome(**spec):
        runtime = kb_runtime(models={"image_generator": spec}, image={"width": SIZE, "height": SIZE})
        return _generate(runtime, MUSTANG, tmp_path)

    # The default profile's hub name, not in the local hub cache: unavailable, with what to configure.
    missing = outcome(name="stabilityai/sd-turbo")
    assert isinstance(missing.error, ModelUnavailableError) and missing.images == ()
    assert "models.image_generator.path" in str(missing.error) and "not in the local hub cache" in str(missing.error)
    wrong = outcome(path=str(tiny_sd["not_a_pipeline"]))
    assert isinstance(wrong.error, ConfigError) and "not a diffusers pipeline folder" in str(wrong.error)
    single = outcome(path=str(next(tiny_sd["taesd"].glob("*.safetensors"))))
    assert isinstance(single.error, ConfigError) and "single file" in str(single.error)
    other = tmp_path / "ddpm"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    kind = outcome(path=str(other))
    assert isinstance(kind.error, ConfigError) and "holds a DDPMPipeline" in str(kind.error)


def test_a_mismatched_ip_adapter_is_refused_and_the_pipeline_stays_usable(kb_runtime, tiny_sd, tmp_path):
    from mmrag.errors import ConfigError

    runtime = kb_runtime(**image_settings(tiny_sd, ip="ip_other_unet"))
    explicit = _generate(runtime, MUSTANG, tmp_path, mode="ip-adapter", seed=3)
    assert isinstance(explicit.error, ConfigError) and explicit.images == ()
    assert "does not match the pipeline sd" in str(explicit.error) and "width [24]" in str(explicit.error)
    auto = _generate(runtime, MUSTANG, tmp_path, seed=3)
    assert auto.error is None and auto.images[0].mode == "img2img"
    assert "IP-Adapter unavailable" in auto.images[0].note and auto.images[0].note in auto.notes
    # Adapter and image encoder disagree: found after load_ip_adapter, which is then undone ...
    runtime = kb_runtime(**image_settings(tiny_sd, ip="ip_other_encoder"))
    bad = _generate(runtime, MUSTANG, tmp_path, mode="ip-adapter", seed=3)
    assert isinstance(bad.error, ConfigError) and "image encoder with 16-d embeddings" in str(bad.error)
    after = _generate(runtime, MUSTANG, tmp_path, out_dir=tmp_path / "after", mode="img2img", seed=3)
    assert after.error is None
    # ... so the UNet is the plain one again: the same picture as from a pipeline that never saw an adapter.
    fresh = kb_runtime(**image_settings(tiny_sd, ip=None))
    same = _generate(fresh, MUSTANG, tmp_path, out_dir=tmp_path / "fresh", mode="img2img", seed=3)
    assert np.array_equal(_pixels(after.images[0].path), _pixels(same.images[0].path))


def test_unreadable_or_huge_references_are_skipped_with_a_note(kb_runtime, kb_data, shared_generator, tiny_sd,
                                                               text_embedder, tmp_path):
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    # Over the pixel budget: every reference is refused, the picture follows the prompt alone.
    runtime = kb_runtime(shared_generator, **image_settings(tiny_sd, max_reference_pixels=100))
    outcome = _generate(runtime, MUSTANG, tmp_path, mode="img2img", seed=1)
    [image] = outcome.images
    assert image.mode == "text" and "no reference image could be read" in image.note
    assert any("exceeds the limit of 100" in note for note in outcome.notes)
    runtime = kb_runtime(shared_generator, **image_settings(tiny_sd, max_reference_bytes=10))
    assert any("the limit is 10 (image.max_reference_bytes)" in n for n in _generate(runtime, MUSTANG, tmp_path).notes)
    # A damaged blob: that reference is skipped and the next one that passes guides the picture.
    data = tmp_path / "data"
    shutil.copytree(kb_data, data)
    settings = load_settings(data_dir=data, ingest={"exclude": EXCLUDE},
                             **image_settings(tiny_sd, reference_threshold=-1.0))  # every retrieved image passes
    with Runtime(settings, ModelSet(settings, text_embedder=text_embedder, image_generator=shared_generator)) as rt:
        grounding = _grounding(rt, MUSTANG)
        best, second = grounding.image_hits[:2]
        Path(rt.blobs.url_of(best.chunk.blob)).write_bytes(b"\x89PNG\r\n\x1a\n broken")
        from generation.image import ImageRequest, generate_images

        outcome = generate_images(rt, MUSTANG, grounding, ImageRequest(mode="img2img", out_dir=tmp_path / "o"))
    [image] = outcome.images
    assert image.mode == "img2img" and image.references == (second.chunk.id,)
    assert outcome.notes and outcome.notes[0].startswith(f"reference {best.chunk.id} skipped: reference image")


def test_enrichment_fits_the_text_encoder_and_says_what_it_added(shared_generator):
    from generation.image import enrich_prompt, image_subject
    from mmrag.records import Chunk, Hit

    count, limit = shared_generator.count_tokens, shared_generator.max_tokens
    assert image_subject("an image of a vintage car from the 1960s, and describe its key features") == \
        "an image of a vintage car from the 1960s"
    ref = Hit(Chunk(id="ref", doc_id="d", modality="image", context="A red 1964 Ford Mustang coupe seen from the "
                    "side, long bonnet and short rear deck."), 0.9)
    long_fact = Hit(Chunk(id="long", doc_id="d", modality="text", text="The Ford Mustang has " + "a very long "
                          "list of chrome trim options and " * 3 + "wheels."), 0.8)
    short_fact = Hit(Chunk(id="short", doc_id="d", modality="text", text="Unrelated opening. The Mustang had a "
                           "289 V8 engine."), 0.7)
    prompt = "a photograph of a red 1964 Ford Mustang coupe parked on a quiet street in the evening sun, " \
             "with chrome bumpers and whitewall tyres, and describe its key features"
    text, used = enrich_prompt(prompt, [ref], [long_fact, short_fact], count, limit)
    assert count(text) <= limit < count(f"{text}. {long_fact.chunk.text}")
    assert [e.chunk_id for e in used] == ["ref", "short"]  # the long fact did not fit; the shorter one did
    assert text == (image_subject(prompt) + ". A red 1964 Ford Mustang coupe seen from the side, long bonnet and "
                    "short rear deck. The Mustang had a 289 V8 engine")
    # A prompt longer than the limit is cut to fit and nothing is added.
    text, used = enrich_prompt("a car " * 100, [ref], [short_fact], count, limit)
    assert count(text) <= limit and used == () and text.startswith("a car a car")


def test_clip_score_and_clip_i_with_the_tiny_clip(tiny_clip, kb_runtime, shared_generator, tmp_path):
    from generation.image_metrics import clip_i, clip_score
    from mmrag.errors import BadInputError

    runtime = kb_runtime(shared_generator)
    [image] = _generate(runtime, MUSTANG, tmp_path, mode="img2img", seed=4).images
    ref = runtime.blobs.get(_grounding(runtime, MUSTANG).image_hits[0].chunk.id and
                            next(h for h in _grounding(runtime, MUSTANG).image_hits
                                 if h.chunk.id == image.references[0]).chunk.blob)
    scores = clip_score(tiny_clip, [image.path, ref], [MUSTANG, "a blue bicycle"])
    vectors = tiny_clip.encode_images([Path(image.path).read_bytes(), ref])
    texts = tiny_clip.encode_texts([MUSTANG, "a blue bicycle"])
    expected = [max(100 * float(v @ t), 0.0) for v, t in zip(vectors, texts)]
    assert scores == pytest.approx(expected, abs=1e-3) and all(0 <= s <= 100 for s in scores)
    sims = clip_i(tiny_clip, [image.path, ref], [[ref, image.path], []])
    assert len(sims[0]) == 2 and sims[1] == []
    assert sims[0][0] == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-3)
    assert sims[0][1] == pytest.approx(1.0, abs=1e-3)  # the image against itself
    with pytest.raises(BadInputError, match="one text per image"):
        clip_score(tiny_clip, [ref], [])
    with pytest.raises(BadInputError, match="cannot read image"):
        clip_i(tiny_clip, [b"not an image"], [[ref]])


@pytest.mark.slow
def test_cli_generate_writes_images_and_lists_them_in_the_json(tmp_path, tiny_sd, tiny_llm_folder):
    kb = tmp_path / "kb"
    shutil.copytree(SAMPLE_KB, kb)
    env = {**os.environ, "MMRAG_MODELS__LLM__PATH": str(tiny_llm_folder), "MMRAG_GENERATION__MAX_NEW_TOKENS": "8",
           "MMRAG_INGEST__EXCLUDE": json.dumps(EXCLUDE), "MMRAG_MODELS__IMAGE_GENERATOR__PATH": str(tiny_sd["sd"]),
           "MMRAG_MODELS__IMAGE_GENERATOR__PRECISION": "fp32",
           "MMRAG_MODELS__IMAGE_GENERATOR__OPTIONS": json.dumps({"ip_adapter": str(tiny_sd["ip"])}),
           "MMRAG_IMAGE__WIDTH": str(SIZE), "MMRAG_IMAGE__HEIGHT": str(SIZE), "MMRAG_IMAGE__REFERENCE_THRESHOLD": "0.1"}
    cli = [sys.executable, "-m", "mmrag.cli", "--data-dir", str(tmp_path / "data")]

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], env=env | extra, capture_output=True, text=True, timeout=600)

    assert run("ingest", str(kb)).returncode == 0
    # No flag: an image, because an image generator is configured.
    done = run("generate", MUSTANG, "--references", "2", "--mode", "ip-adapter", "--seed", "7",
               "--out", str(tmp_path / "images"), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {"text", "citations", "unsupported", "abstained", "removed_citations", "abstain_reason", "sources",
            "model", "finish_reason", "usage"} <= set(data) and data["image_error"] is None
    [image] = data["images"]
    assert {"path", "mode", "references", "seed", "prompt"} <= set(image)
    assert image["mode"] == "ip-adapter" and image["seed"] == 7 and image["prompt"] == MUSTANG
    assert len(image["references"]) == 2 and Path(image["path"]).parent == tmp_path / "images"
    from generation.image import read_provenance

    assert read_provenance(image["path"])["references"] == image["references"]
    # --no-image: text only; the image generator is not even loaded (a broken one goes unnoticed).
    broken = {"MMRAG_MODELS__IMAGE_GENERATOR__PATH": str(tmp_path / "nope")}
    done = run("generate", MUSTANG, "--no-image", "--json", **broken)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["images"] == [] and data["image_error"] is None and data["usage"]["prompt_tokens"] > 0
    # --image with no usable image generator: the answer still comes (the model ran), then exit 4 (model
    # unavailable) and why.
    done = run("generate", MUSTANG, "--image", "--json", **broken)
    assert done.returncode == 4, done.stderr
    data = json.loads(done.stdout)
    assert data["usage"]["prompt_tokens"] > 0 and data["finish_reason"] and data["images"] == []
    assert "image generation is unavailable" in data["image_error"] and "does not exist" in data["image_error"]
    assert "error: no image: image generation is unavailable" in done.stderr
