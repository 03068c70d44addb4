"""Device, precision and thread choices, made from the hardware and overridable in the profile."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (avx512_bf16 or AMX); there bf16 matmuls run ~4x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        from mmrag.errors import ConfigError

        raise ConfigError("runtime.device is 'cuda' but torch sees no CUDA device; set it to 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_dtype(precision: str, device: str):
    """The torch dtype for a model: fp16 on GPUs, bf16 on CPUs with bf16 instructions, fp32 otherwise."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision in ("int8", "int4"):
        from mmrag.errors import ConfigError

        raise ConfigError(f"precision {precision!r} applies to models.llm on CPU only (its lean decoder); "
                          "use 'auto', 'fp32', 'bf16' or 'fp16' here")
    if precision == "bf16":
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: the configured number, or every core this process may use."""
    import torch

    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            threads = os.cpu_count() or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
