"""Whether Triton runs kernels on its CPU interpreter (TRITON_INTERPRET=1), where some operations differ
from the GPU (bf16 dots in fp32, a truncating float32 -> bf16 cast): the kernels take that as a flag."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
