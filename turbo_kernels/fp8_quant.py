"""Triton per-row e4m3 quantiser of the fp8 W8A8 linears' activations (issues 6 and 8).

Computes exactly `fp8_linear.quantize_rows_e4m3`: per row r of X [M, K] (bf16 / fp16 / fp32, unit column
stride), amax_r = max(1e-8, max|x_r|) in float32, scale_r = amax_r / 448, inverse_r = 448 / amax_r (both
correctly rounded: `div_rn`, Triton's "/" is approximate on the GPU) and code = e4m3(x · inverse_r), clamped
to ±448 and rounded to nearest even. A product by a per-row inverse rather than a division per element: the
division is a long instruction sequence on the GPU and made the first version of this kernel cost 0.6 ms at
M = 75600, K = 5120 on an H200 (2.2 ms at K = 8960, where the row no longer fitted in registers).

The kernel (ROWS rows per program, two sweeps over BLOCK_K-wide column chunks, so any K up to `MAX_ROW`
works without spilling) is `row_quant.quantize_rows_kernel`, shared with the row-wise int8 quantiser.

GPUs: compute capability >= 8.9 (the e4m3 conversion, `cvt.rn.satfinite.e4m3x2.f32`), where the fp8 linears
run `_scaled_mm` anyway.
Tested: bit-exact codes and scales against the PyTorch quantiser under TRITON_INTERPRET=1 (ragged K, zero
rows, saturating and subnormal values; tests/test_fp8_quant_interpret.py) and compiled for sm90 without a GPU
(tests/test_fused_norms_compile.py); `linear_kernels` checks it against the PyTorch quantiser on first use
per device and keeps PyTorch's if they differ.
"""

from __future__ import annotations

import torch

from .fp8_linear import E4M3, E4M3_MAX
from .row_quant import quantize_rows


def quantize_rows_e4m3_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x -> (e4m3 codes with x's shape, float32 scale per row), as `quantize_rows_e4m3`."""
    return quantize_rows(x, E4M3, E4M3_MAX)
