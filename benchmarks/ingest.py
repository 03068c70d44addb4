"""Ingest throughput against the bare model, side by side in one run. Prints JSON.

- images/s through the whole ingest path (read, decode, preprocess, CLIP embed, context-text embed, blob write,
  Milvus write) over ../shared/data/tuxpaint/images, against the same CLIP model's bare forward pass over the same
  images already preprocessed, at the same batch size and precision;
- text chunks/s through the whole path over HaluEval passages written as text files, against the bare forward
  passes of the two text encoders (MiniLM and CLIP's text tower) over the same chunks.
ViT-B-32 has random weights here (no CLIP weights exist offline): the real architecture, so the real cost.
Targets on the 2-core bf16 machine: pipeline >= 80% of bare, >= 45 images/s end to end.

Each round times the bare pass and the pipeline back to back; ``image_ratio_per_round`` gives their ratio per
round (on a shared machine, the ratio of one round's pair is steadier than the ratio of medians). The load
average is printed at the start and the end. ``image_stages_ms_per_image`` is where the pipeline's time went in
its median round (the main thread's wall ms per image, and the lanes' ms per image summed over lanes).
``--profile`` adds ``image_stage_core_ms``: each stage of the image path timed alone on one thread over the same
images (CPU ms per image; the forward pass as CPU ms of all its threads).

    python benchmarks/ingest.py [--rounds 2] [--batch 32] [--precision auto] [--images 200] [--profile]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved bare/pipeline rounds (median reported)")
    parser.add_argument("--batch", type=int, default=None, help="CLIP image batch [default: the profile's]")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--passages", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="also time each stage of the image path alone")
    args = parser.parse_args()
    _common.offline_env()
    load_start = os.getloadavg()

    import torch

    from mmrag.config import load_settings
    from mmrag.device import configure_threads
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    configure_threads(args.threads)
    data = _common.shared_data()
    images = sorted((data / "tuxpaint" / "images").glob("*.png"))[: args.images]
    work = Path(tempfile.mkdtemp(prefix="mmrag-bench-"))
    text_dir = work / "passages"
    text_dir.mkdir()
    passages = [json.loads(line)["knowledge"] for line in (data / "halueval" / "qa_dev.jsonl").open()][: args.passages]
    for i in range(0, len(passages), 10):  # 10 passages a file, one passage a paragraph
        (text_dir / f"p{i:05d}.txt").write_text("\n\n".join(passages[i:i + 10]))

    base = load_settings(data_dir=work / "warm")
    batch = args.batch or base.ingest.image_batch
    clip = _common.random_clip(precision=args.precision, batch_size=batch)
    embedder = ModelSet(base).text_embedder

    create_s: list[float] = []

    def runtime(name: str) -> Runtime:
        """A fresh knowledge base, created before the clock starts: creating collections and indexes is a
        one-off cost per knowledge base (reported as kb_create_s), not a per-file one."""
        settings = load_settings(data_dir=work / name, ingest={"image_batch": batch})
        rt = Runtime(settings, ModelSet(settings, clip=clip, text_embedder=embedder))
        start = time.perf_counter()
        rt.index.ensure(embedder.signature, clip.signature)
        create_s.append(time.perf_counter() - start)
        return rt

    # Warm up every path once (first Milvus writes, first forward passes).
    with runtime("warm") as rt:
        rt.ingestor.ingest(images[:batch] + [next(text_dir.iterdir())])

    pixels = torch.stack([clip.preprocess_bytes(p.read_bytes()) for p in images])
    results: dict[str, list[float]] = {"bare_images_per_s": [], "pipeline_images_per_s": [],
                                       "bare_text_chunks_per_s": [], "pipeline_text_chunks_per_s": []}
    chunk_texts: list[str] = []
    stages: list[dict[str, float]] = []
    for round_no in range(args.rounds):
        start = time.perf_counter()
        for s in range(0, len(pixels), batch):
            clip.encode_image_tensors(pixels[s:s + batch])
        results["bare_images_per_s"].append(len(images) / (time.perf_counter() - start))

        with runtime(f"img{round_no}") as rt:
            start = time.perf_counter()
            report = rt.ingestor.ingest([data / "tuxpaint" / "images"] if args.images >= 200 else images)
            results["pipeline_images_per_s"].append(report.chunks["image"] / (time.perf_counter() - start))
            per_image = 1000.0 / max(1, report.chunks["image"])
            stages.append({**{f"main_{k}": round(v * per_image, 2) for k, v in rt.ingestor.timings.items()},
                           **{f"lanes_{k}": round(v * per_image, 2) for k, v in rt.ingestor.lane_timings.items()}})

        with runtime(f"txt{round_no}") as rt:
            start = time.perf_counter()
            report = rt.ingestor.ingest([text_dir])
            results["pipeline_text_chunks_per_s"].append(report.chunks["text"] / (time.perf_counter() - start))
            if not chunk_texts:
                chunk_texts = [r["text"] for r in rt.index.chunk_rows("", ["text"])]
        start = time.perf_counter()
        embedder.encode(chunk_texts)
        clip.encode_texts(chunk_texts)
        results["bare_text_chunks_per_s"].append(len(chunk_texts) / (time.perf_counter() - start))

    summary = {k: _common.median(v) for k, v in results.items()}
    per_round = [p / b for p, b in zip(results["pipeline_images_per_s"], results["bare_images_per_s"])]
    median_round = sorted(range(len(per_round)), key=per_round.__getitem__)[len(per_round) // 2]
    profile = stage_profile(clip, embedder, images, batch, work) if args.profile else None
    out = {
        "benchmark": "ingest",
        "model": "ViT-B-32 (random weights, real cost) + all-MiniLM-L6-v2",
        "precision": str(clip.dtype).replace("torch.", ""),
        "image_batch": batch,
        "images": len(images),
        "text_chunks": len(chunk_texts),
        "rounds": args.rounds,
        **summary,
        "image_pipeline_vs_bare": round(summary["pipeline_images_per_s"] / summary["bare_images_per_s"], 3),
        "image_ratio_per_round": [round(r, 3) for r in per_round],
        "image_ratio_median_of_rounds": round(_common.median(per_round), 3),
        "image_stages_ms_per_image": stages[median_round],
        **({"image_stage_core_ms": profile} if profile else {}),
        "text_pipeline_vs_bare": round(summary["pipeline_text_chunks_per_s"] / summary["bare_text_chunks_per_s"], 3),
        "kb_create_s": _common.median(create_s),
        "targets": {"image_pipeline_vs_bare": 0.8, "pipeline_images_per_s": 45},
        "raw": {k: [round(x, 2) for x in v] for k, v in results.items()},
        "machine": _common.machine(),
        "load_average_1min": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def stage_profile(clip, embedder, images: list[Path], batch: int, work: Path) -> dict[str, float]:
    """CPU ms per image of each stage of the image path, each timed alone (one thread; forward and text
    embedding: every thread of the process), over the same images."""
    import numpy as np
    import torch

    from ingest.parsers import parse_file
    from ingest.pipeline import parse_options
    from ingest.safety import check_image
    from mmrag.config import load_settings

    options = parse_options(load_settings(data_dir=work / "profile"))
    spent: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.thread_time()
        out = fn(*args)
        spent[name] = spent.get(name, 0.0) + time.thread_time() - start
        return out

    contexts, tensors = [], []
    for path in images:
        data = timed("read", path.read_bytes)
        timed("sha256", lambda: hashlib.sha256(data).hexdigest())
        decoded = timed("decode (open + load)", check_image, data, options.max_image_pixels).image
        elements = timed("parse_file (decode, context, metadata)", parse_file, path, data, options)
        contexts.append(elements[0].context)
        rgb = timed("alpha flatten + RGB", clip.to_rgb, decoded)
        small = timed("resize + crop", clip._pil_head, rgb)
        tensors.append(timed("to uint8 tensor", lambda: torch.from_numpy(np.array(small, dtype=np.uint8))
                             .permute(2, 0, 1)))
    out = {k: spent[k] * 1000 / len(images) for k in spent}
    pixels = torch.stack(tensors)

    def cpu_ms(fn) -> float:
        start = time.process_time()
        for s in range(0, len(images), batch):
            fn(s)
        return (time.process_time() - start) * 1000 / len(images)

    out["normalise"] = cpu_ms(lambda s: pixels[s:s + batch].float().sub_(clip._mean).div_(clip._std))
    threads = torch.get_num_threads()
    out[f"normalise + forward ({threads} threads)"] = cpu_ms(lambda s: clip.encode_image_tensors(pixels[s:s + batch]))
    torch.set_num_threads(1)
    out["normalise + forward (1 thread)"] = cpu_ms(lambda s: clip.encode_image_tensors(pixels[s:s + batch]))
    torch.set_num_threads(threads)
    out["context text, MiniLM"] = cpu_ms(lambda s: embedder.encode(contexts[s:s + batch]))
    return {k: round(v, 3) for k, v in out.items()}


if __name__ == "__main__":
    main()
