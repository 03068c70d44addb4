"""Make torchvision importable next to a CPU-only torch.

PyPI's torchvision wheels are CUDA builds; with the CPU torch their compiled part does not load and ``import
torchvision`` fails with ``operator torchvision::nms does not exist`` (pytorch/vision#9085). open_clip, and parts of
transformers and diffusers, import torchvision. ``ensure_torchvision()`` imports it; only when that exact failure
happens does it define the two operator schemas torchvision registers fake kernels for (with a plain-torch CPU
``nms``) and import again. Nothing happens at import of this module; the model loaders call it.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)

_DONE = False


def _nms_cpu(dets, scores, iou_threshold: float):
    import torch

    order = scores.argsort(descending=True)
    keep: list[int] = []
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(dets), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _define_ops() -> None:
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
    )
    lib.impl("nms", _nms_cpu, "CPU")
    # Keep the library object alive for the life of the process, otherwise the definitions are dropped.
    globals()["_TORCHVISION_LIB"] = lib


def ensure_torchvision() -> None:
    """Import torchvision, repairing the CPU-torch/CUDA-torchvision mismatch when (and only when) it occurs."""
    global _DONE
    if _DONE:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
        logger.debug("torchvision's compiled ops are missing (CPU torch); defining nms schemas in Python")
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_ops()
        import torchvision  # noqa: F401,F811
    _DONE = True
