"""Import torchvision's v2 transforms as the reference for image preprocessing.

With CPU torch, the only torchvision wheel matching torch 2.13 is a CUDA build whose compiled ops do not
load; declaring the two operator schemas its import registers fake kernels for lets the pure-Python
transforms import (COMFYUI_HOST.md §1.3). Returns None when torchvision is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch

_keep_alive: list[torch.library.Library] = []


def _has_nms_schema() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def import_transforms_v2() -> ModuleType | None:
    if importlib.util.find_spec("torchvision") is None:
        return None
    if not _has_nms_schema():
        try:
            import torchvision  # noqa: F401  (a matching build registers its ops itself)
        except RuntimeError:
            for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
                del sys.modules[name]  # drop the half-imported package before importing it again
            library = torch.library.Library("torchvision", "DEF")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _keep_alive.append(library)
    import torchvision.transforms.v2 as transforms

    return transforms
