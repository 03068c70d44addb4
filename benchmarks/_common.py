"""Helpers shared by the benchmarks: the import path, locating ../shared/data, and building random-weight models
with real cost.

Each script has ``import _common`` before any import of the product's. Run as ``python benchmarks/X.py`` (from
any folder), Python puts this folder first on ``sys.path``, where ingest.py, search.py, ... would shadow the
product's packages of the same names: importing this module takes the folder off the path and puts the repository
(the product's packages) and tests/ (the harnesses the benchmarks share with the tests) first. Imported any other
way (``benchmarks._common``) it leaves ``sys.path`` alone.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_HERE = ROOT / "benchmarks"
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    _first = [ROOT, ROOT / "tests"]
    sys.path[:] = [str(p) for p in _first] + [p for p in sys.path
                                              if Path(p or ".").resolve() not in {_HERE, *_first}]


def shared_data() -> Path:
    path = Path(os.environ.get("MMRAG_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        sys.exit(f"shared data not found at {path}; set MMRAG_SHARED_DATA")
    return path


def offline_env() -> None:
    import logging

    logging.disable(logging.WARNING)  # random-weight and milvus-lite notices would bury the JSON
    logging.getLogger("grpc").setLevel(logging.CRITICAL)  # milvus-lite's server logs calls it lacks as errors
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)


def random_clip(arch: str = "ViT-B-32", precision: str = "auto", batch_size: int = 32):
    """open_clip with random weights: the real architecture, so the real compute cost (benchmarks only)."""
    import torch

    from mmrag.compat import ensure_torchvision
    from mmrag.device import pick_dtype
    from mmrag.encoders import ClipEncoder

    ensure_torchvision()
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    return ClipEncoder(model, preprocess, open_clip.get_tokenizer(arch), f"{arch}/random",
                       dtype=pick_dtype(precision, "cpu"), batch_size=batch_size)


# stabilityai/sd-turbo unet/config.json (Stable Diffusion 2.1 base: 865M parameters, cross-attention width 1024).
SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", center_input_sample=False, downsample_padding=1,
    mid_block_scale_factor=1, norm_eps=1e-5, upcast_attention=None)


def sd_turbo_unet(seed: int = 0):
    """A UNet with SD-Turbo's architecture and random weights: the real compute cost (benchmarks only)."""
    import torch

    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD_TURBO_UNET).eval()


def machine() -> dict[str, Any]:
    import torch

    from mmrag.device import cpu_has_bf16

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "bf16_cpu": cpu_has_bf16(), "torch": torch.__version__}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)
