"""Host-side TMA tensor descriptors: whether this Triton has them and where the kernels use them."""

from __future__ import annotations

import torch

from .interpreter import interpreting

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4: pointer loads only
    TensorDescriptor = None


def descriptors_supported(device: torch.device) -> bool:
    """TMA descriptors pay on Hopper; elsewhere (and in the interpreter) plain pointer loads are used."""
    return (
        TensorDescriptor is not None
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] == 9
        and not interpreting()
    )
