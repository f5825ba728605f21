"""Triton per-row e4m3 quantiser of the fp8 W8A8 linears' activations (issue 8).

Computes exactly `fp8_linear.quantize_rows_e4m3`: per row r of X [M, K] (bf16 / fp16 / fp32, unit column
stride), amax_r = max(1e-8, max|x_r|) in float32, scale_r = amax_r / 448 and code = e4m3(x / scale_r), both
divisions correctly rounded (`div_rn`; Triton's "/" is approximate on the GPU), the quotient clamped to ±448
and rounded to nearest even. One program per row: one read of X, one byte written per element, against the
four float32 passes of the PyTorch version, which cost more than the fp8 GEMM itself (bench/RESULTS.md:
7.5 ms complete vs 3.4 ms for `_scaled_mm` at M = 75600, K = N = 5120 on an H200).

GPUs: compute capability >= 8.9 (the e4m3 conversion, `cvt.rn.satfinite.e4m3x2.f32`), where the fp8 linears
run `_scaled_mm` anyway. Rows up to 16384 elements (every Wan linear: K <= 13824).
Tested: bit-exact codes and scales against the PyTorch quantiser under TRITON_INTERPRET=1 (ragged K, zero
rows, saturating and subnormal values; tests/test_fp8_quant_interpret.py) and compiled for sm90 without a GPU
(tests/test_fused_norms_compile.py); `linear_kernels` checks it against the PyTorch quantiser on first use
per device and keeps PyTorch's if they differ. Not yet timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_linear import AMAX_FLOOR, E4M3, E4M3_MAX
from .interpreter import interpreting
from .sage_prepass import to_e4m3

MAX_ROW = 16384
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_E4M3_MAX = tl.constexpr(E4M3_MAX)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, codes_ptr, scale_ptr, K, stride_xm, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    mask = columns < K
    x = tl.load(x_ptr + row * stride_xm + columns, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), _AMAX_FLOOR)
    scale = tl.math.div_rn(amax, tl.full((), _E4M3_MAX, tl.float32))
    quotient = tl.math.div_rn(x, tl.zeros_like(x) + scale)
    quotient = tl.minimum(tl.maximum(quotient, -_E4M3_MAX), _E4M3_MAX)
    tl.store(codes_ptr + row * K + columns, to_e4m3(quotient, INTERPRET), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows_e4m3_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x -> (e4m3 codes with x's shape, float32 scale per row), as `quantize_rows_e4m3`."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected a row-major 2-D matrix, got shape {tuple(x.shape)}, strides {x.stride()}")
    rows, columns = x.shape
    if columns > MAX_ROW:
        raise ValueError(f"rows of {columns} elements exceed the kernel's {MAX_ROW}")
    codes = torch.empty(rows, columns, dtype=E4M3, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0 or columns == 0:
        return codes, scale
    block = triton.next_power_of_2(columns)
    _quantize_rows_kernel[(rows,)](
        x,
        codes,
        scale,
        columns,
        x.stride(0),
        BLOCK=block,
        INTERPRET=interpreting(),
        num_warps=4 if block <= 2048 else 8,
        enable_fp_fusion=False,
    )
    return codes, scale
