"""Helpers shared by the benchmarks: locating ../shared/data and building random-weight models with real cost."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


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


def machine() -> dict[str, Any]:
    import torch

    from mmrag.device import cpu_has_bf16

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "bf16_cpu": cpu_has_bf16(), "torch": torch.__version__}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)
