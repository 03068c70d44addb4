"""Ingest throughput against the bare model, side by side in one run. Prints JSON.

- images/s through the whole ingest path (read, decode, preprocess, CLIP embed, context-text embed, blob write,
  Milvus write) over ../shared/data/tuxpaint/images, against the same CLIP model's bare forward pass over the same
  images already preprocessed, at the same batch size and precision;
- text chunks/s through the whole path over HaluEval passages written as text files, against the bare forward
  passes of the two text encoders (MiniLM and CLIP's text tower) over the same chunks.
ViT-B-32 has random weights here (no CLIP weights exist offline): the real architecture, so the real cost.
Targets on the 2-core bf16 machine: pipeline >= 80% of bare, >= 45 images/s end to end.

    python benchmarks/ingest.py [--rounds 2] [--batch 32] [--precision auto] [--images 200]
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    _common.offline_env()

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
    for round_no in range(args.rounds):
        start = time.perf_counter()
        for s in range(0, len(pixels), batch):
            clip.encode_image_tensors(pixels[s:s + batch])
        results["bare_images_per_s"].append(len(images) / (time.perf_counter() - start))

        with runtime(f"img{round_no}") as rt:
            start = time.perf_counter()
            report = rt.ingestor.ingest([data / "tuxpaint" / "images"] if args.images >= 200 else images)
            results["pipeline_images_per_s"].append(report.chunks["image"] / (time.perf_counter() - start))

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
        "text_pipeline_vs_bare": round(summary["pipeline_text_chunks_per_s"] / summary["bare_text_chunks_per_s"], 3),
        "kb_create_s": _common.median(create_s),
        "targets": {"image_pipeline_vs_bare": 0.8, "pipeline_images_per_s": 45},
        "raw": {k: [round(x, 2) for x in v] for k, v in results.items()},
        "machine": _common.machine(),
    }
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
