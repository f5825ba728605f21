"""The per-row activation quantiser of the W8A8 linears in PyTorch, without Triton: the reference of the
kernel in `row_quant.py`, and the path where that kernel does not run.

Per row r of a 2-D x: amax_r = max(1e-8, max|x_r|) in float32, scale_r = amax_r / LEVELS, code =
x · (LEVELS / amax_r) clamped to ±LEVELS, then rounded half to even to an integer (int8 codes) or to e4m3.
"""

from __future__ import annotations

import torch

AMAX_FLOOR = 1e-8


def quantize_rows_reference(
    x: torch.Tensor, codes_dtype: torch.dtype, levels: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x -> (codes of `codes_dtype` with x's shape, float32 scale per row = amax_r / `levels`)."""
    if x.dim() != 2:
        raise ValueError(f"the per-row quantiser takes a 2-D matrix, got shape {tuple(x.shape)}")
    x32 = x.float()
    amax = x32.abs().amax(dim=1).clamp_min(AMAX_FLOOR)
    # Tensor by tensor: PyTorch divides by a Python scalar as a product with its reciprocal on the GPU
    # (not on the CPU), which would make the scales depend on the device.
    levels_per_row = torch.full_like(amax, levels)
    scale, inverse = amax / levels_per_row, levels_per_row / amax
    quotient = (x32 * inverse[:, None]).clamp_(-levels, levels)
    if codes_dtype == torch.int8:
        quotient = torch.round(quotient)
    return quotient.to(codes_dtype), scale
