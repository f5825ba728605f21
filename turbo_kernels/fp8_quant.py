"""Triton per-row e4m3 quantiser of the fp8 W8A8 linears' activations (issues 6 and 8).

Computes exactly `fp8_linear.quantize_rows_e4m3`: per row r of X [M, K] (bf16 / fp16 / fp32, unit column
stride), amax_r = max(1e-8, max|x_r|) in float32, scale_r = amax_r / 448, inverse_r = 448 / amax_r (both
correctly rounded: `div_rn`, Triton's "/" is approximate on the GPU) and code = e4m3(x · inverse_r), clamped
to ±448 and rounded to nearest even. A product by a per-row inverse rather than a division per element: the
division is a long instruction sequence on the GPU and made the first version of this kernel cost 0.6 ms at
M = 75600, K = 5120 on an H200 (2.2 ms at K = 8960, where the row no longer fitted in registers).

Each program quantises ROWS rows in two sweeps over BLOCK_K-wide column chunks (amax, then codes; the second
read comes from L2), so any K up to `MAX_ROW` works without spilling.

GPUs: compute capability >= 8.9 (the e4m3 conversion, `cvt.rn.satfinite.e4m3x2.f32`), where the fp8 linears
run `_scaled_mm` anyway.
Tested: bit-exact codes and scales against the PyTorch quantiser under TRITON_INTERPRET=1 (ragged K, zero
rows, saturating and subnormal values; tests/test_fp8_quant_interpret.py) and compiled for sm90 without a GPU
(tests/test_fused_norms_compile.py); `linear_kernels` checks it against the PyTorch quantiser on first use
per device and keeps PyTorch's if they differ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_linear import AMAX_FLOOR, E4M3, E4M3_MAX
from .interpreter import interpreting
from .sage_prepass import to_e4m3

MAX_ROW = 65536
TILE_ELEMENTS = 2048  # elements per chunk of one program: 16 per thread at 4 warps
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_E4M3_MAX = tl.constexpr(E4M3_MAX)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    M,
    K,
    stride_xm,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    code_rows = codes_ptr + rows.to(tl.int64)[:, None] * K
    amax = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        columns = start + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (columns < K)[None, :]
        x = tl.load(x_rows + columns[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    amax = tl.maximum(amax, _AMAX_FLOOR)
    e4m3_max = tl.full([ROWS], _E4M3_MAX, tl.float32)
    inverse = tl.math.div_rn(e4m3_max, amax)
    for start in range(0, K, BLOCK_K):
        columns = start + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (columns < K)[None, :]
        x = tl.load(x_rows + columns[None, :], mask=mask, other=0.0).to(tl.float32)
        quotient = tl.minimum(tl.maximum(x * inverse[:, None], -_E4M3_MAX), _E4M3_MAX)
        tl.store(code_rows + columns[None, :], to_e4m3(quotient, INTERPRET), mask=mask)
    tl.store(scale_ptr + rows, tl.math.div_rn(amax, e4m3_max), mask=row_mask)


def launch_config(columns: int) -> tuple[int, int]:
    """(ROWS, BLOCK_K) for rows of `columns` elements: chunks that divide the row where a power of two
    of at least 256 does (every Wan width: 1536 -> 512, 5120 -> 1024, 8960 -> 256, 13824 -> 512), else
    the row rounded up to a power of two (capped), and as many rows as fill a chunk of TILE_ELEMENTS."""
    lowest_bit = columns & -columns
    block_k = min(lowest_bit, 1024) if lowest_bit >= 256 else min(triton.next_power_of_2(columns), 1024)
    return max(1, TILE_ELEMENTS // block_k), block_k


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
    rows_per_program, block_k = launch_config(columns)
    _quantize_rows_kernel[(triton.cdiv(rows, rows_per_program),)](
        x,
        codes,
        scale,
        rows,
        columns,
        x.stride(0),
        ROWS=rows_per_program,
        BLOCK_K=block_k,
        INTERPRET=interpreting(),
        num_warps=4,
        enable_fp_fusion=False,
    )
    return codes, scale
