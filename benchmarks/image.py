"""Seconds per 512x512 image on an SD-Turbo-sized pipeline with random weights (the compute is real). Prints JSON.

No diffusion weights exist offline, so the pipeline is built from configs: the UNet of stabilityai/sd-turbo (the
Stable Diffusion 2.1 base architecture: 865M parameters, cross-attention width 1024), its OpenCLIP ViT-H text encoder
(CLIPTextModel, 23 layers of width 1024), the SD VAE and diffusers' ``AutoencoderTiny`` (TAESD), with CLIP's real
tokenizer (rebuilt from open_clip's BPE merges). The images are made by the product's own denoising call
(``generation.image.ImageGenerator.run``), and the share of time in each part comes from its forward hooks
(``generation.image.part_timer``): text encoder, IP-Adapter image encoder, UNet, VAE.

Measured, each configuration ``--rounds`` times after one warm-up image (medians):
  - text-to-image at 1 and 4 steps, full VAE vs tiny autoencoder, fp32 vs bf16 (8 configurations);
  - bf16 vs fp32 outputs: cosine of one UNet step's output, the same input in both precisions;
  - with ``--ip-adapter``: the ip-adapter mode at 1 step, bf16, tiny autoencoder, guided by one reference, with a
    random IP-Adapter matching the UNet and a random ViT-H/14 image encoder (the h94/IP-Adapter encoder's size),
    saved in the IP-Adapter layout and loaded through ``load_ip_adapter``.
Target (the issue): a one-step 512 px image in <= 3 s with the tiny autoencoder.

    python benchmarks/image.py --quick          # one configuration: 1 step, bf16, tiny autoencoder (about 1 min)
    python benchmarks/image.py [--rounds 2] [--ip-adapter]   # everything (10-15 min on the 2-core machine)

Absolute times on the shared 2-core machine drift with the other work on it; compare configurations from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)
from tinydiffusion import build_clip_tokenizer, ip_adapter_state  # tests/tinydiffusion.py: one builder of each

SIZE = 512
# stabilityai/sd-turbo text_encoder/config.json (OpenCLIP ViT-H/14 text tower).
SD_TURBO_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                     projection_dim=512, hidden_act="gelu", max_position_embeddings=77, bos_token_id=49406,
                     eos_token_id=49407, pad_token_id=1, vocab_size=49408)
# stabilityai/sd-turbo vae/config.json.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=768, scaling_factor=0.18215)
# h94/IP-Adapter models/image_encoder/config.json (OpenCLIP ViT-H/14 vision tower).
VIT_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                    patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
PROMPT = "an image of a red 1964 Ford Mustang coupe. A red 1964 Ford Mustang coupe seen from the side"


def build_pipeline(folder: Path):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=_common.sd_turbo_unet(), vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(
            **SD_TURBO_TEXT)), tokenizer=build_clip_tokenizer(folder / "tokenizer"),
        scheduler=EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1, prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False).to("cpu")


def save_ip_adapter(folder: Path, unet) -> Path:
    """A random IP-Adapter for ``unet`` (SD-family layout: models/ip-adapter_sd15.safetensors) with a random
    ViT-H/14 image encoder, saved in bf16 (the benchmark runs the ip-adapter mode in bf16)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H_VISION)).to(torch.bfloat16).save_pretrained(
        folder / "models" / "image_encoder")
    state = ip_adapter_state(unet, VIT_H_VISION["projection_dim"], scale=0.02)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()},
              str(folder / "models" / "ip-adapter_sd15.safetensors"))
    return folder


def measure(generator, mode: str, steps: int, rounds: int, references: list) -> dict[str, Any]:
    runs = []
    for i in range(rounds + 1):  # the first is a warm-up
        _, timings, _ = generator.run(mode, PROMPT, references, seed=i, steps=steps, width=SIZE, height=SIZE,
                                      guidance_scale=0.0, strength=1.0, ip_adapter_scale=0.6)
        if i:
            runs.append(timings)
    total = statistics.median(t["total"] for t in runs)
    parts = {name: round(statistics.median(t[name] for t in runs), 3)
             for name in ("text_encoder", "image_encoder", "unet", "vae")}
    other = max(total - sum(parts.values()), 0.0)
    return {"seconds_per_image": round(total, 3), "seconds_per_part": parts,
            "share": {name: round(value / total, 3) for name, value in (parts | {"other": other}).items()},
            "unet_s_per_step": round(parts["unet"] / steps, 3)}


def unet_cosine(pipe) -> float:
    """Cosine between fp32 and bf16 outputs of one UNet step on the same input (call while the UNet is fp32)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    context = torch.randn(1, 77, 1024, generator=generator)
    with torch.inference_mode():
        full = pipe.unet(latents, 999, context).sample.flatten().float()
        pipe.unet.to(torch.bfloat16)
        half = pipe.unet(latents.bfloat16(), 999, context.bfloat16()).sample.flatten().float()
        pipe.unet.to(torch.float32)
    return round(float(torch.nn.functional.cosine_similarity(full, half, dim=0)), 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one configuration: 1 step, bf16, tiny autoencoder")
    parser.add_argument("--rounds", type=int, default=2, help="timed images per configuration (after a warm-up)")
    parser.add_argument("--ip-adapter", action="store_true", help="also the ip-adapter mode (builds a ViT-H)")
    args = parser.parse_args()
    _common.offline_env()
    from mmrag.compat import ensure_torchvision
    from mmrag.device import configure_threads

    ensure_torchvision()
    configure_threads(None)
    import torch
    from diffusers import AutoencoderTiny
    from PIL import Image

    from generation.image import ImageGenerator

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mmrag-image-bench-"))
    pipe = build_pipeline(work)
    vae = pipe.vae
    torch.manual_seed(0)
    tiny = AutoencoderTiny()  # TAESD's configuration
    build_s = time.perf_counter() - started
    result: dict[str, Any] = {"machine": _common.machine(), "size": SIZE, "rounds": args.rounds,
                              "unet_parameters_m": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
                              "build_s": round(build_s, 1), "configurations": []}
    steps_list = [1] if args.quick else [1, 4]
    dtypes = [torch.bfloat16] if args.quick else [torch.float32, torch.bfloat16]
    decoders = [("tiny", tiny)] if args.quick else [("vae", vae), ("tiny", tiny)]
    if not args.quick:
        result["bf16_vs_fp32_unet_output_cosine"] = unet_cosine(pipe)
    for dtype in dtypes:
        pipe.to(dtype=dtype)
        vae.to(dtype=dtype)
        tiny.to(dtype=dtype)
        for decoder_name, decoder in decoders:
            pipe.register_modules(vae=decoder)
            generator = ImageGenerator(pipe, "sd-turbo-architecture/random", family="sd", device="cpu", dtype=dtype,
                                       autoencoder=decoder_name)
            for steps in steps_list:
                row = {"mode": "text", "steps": steps, "dtype": str(dtype).replace("torch.", ""),
                       "decoder": decoder_name} | measure(generator, "text", steps, args.rounds, [])
                result["configurations"].append(row)
                print(json.dumps(row), file=sys.stderr)
    if args.ip_adapter:
        folder = save_ip_adapter(work / "ip-adapter", pipe.unet)
        pipe.to(dtype=torch.bfloat16)
        tiny.to(dtype=torch.bfloat16)
        pipe.register_modules(vae=tiny)
        generator = ImageGenerator(pipe, "sd-turbo-architecture/random", family="sd", device="cpu",
                                   dtype=torch.bfloat16, options={"ip_adapter": str(folder)}, autoencoder="tiny")
        error = generator.ip_adapter_error()
        if error is not None:
            raise error
        reference = Image.open(Path(__file__).resolve().parents[1] / "mmrag" / "sample_kb" / "images" /
                               "mustang-1964.png").convert("RGB")
        row = {"mode": "ip-adapter", "steps": 1, "dtype": "bfloat16", "decoder": "tiny", "references": 1} | measure(
            generator, "ip-adapter", 1, args.rounds, [reference])
        result["configurations"].append(row)
    target = [c for c in result["configurations"] if c["mode"] == "text" and c["steps"] == 1
              and c["decoder"] == "tiny" and c["dtype"] == "bfloat16"]
    if target:
        result["target"] = {"goal": "one-step 512 px image <= 3 s with the tiny autoencoder",
                            "seconds": target[0]["seconds_per_image"], "met": target[0]["seconds_per_image"] <= 3.0}
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
