"""The per-row activation quantiser shared by the e4m3 (`fp8_quant.py`) and the row-wise int8
(`rowwise_gemm.py`) W8A8 linears: both scale row r by a correctly rounded LEVELS / amax_r.

Each program of `quantize_rows_kernel` quantises ROWS rows in two sweeps over BLOCK_K-wide column chunks
(amax, then codes; the second read comes from L2), so any K up to `MAX_ROW` works without spilling.
amax_r = max(1e-8, max|x_r|) in float32, inverse_r = LEVELS / amax_r and scale_r = amax_r / LEVELS (both
`div_rn`: Triton's "/" is approximate on the GPU), then code = x · inverse_r clamped to ±LEVELS and
rounded to nearest even, to e4m3 or (INTEGER) to an integer. `quantize_rows` launches it with the levels of
the codes' type (with `enable_fp_fusion=False`, so that the rounding trick below is not contracted into an
FMA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpreting
from .row_quant_reference import AMAX_FLOOR
from .sage_prepass import to_e4m3

MAX_ROW = 65536
TILE_ELEMENTS = 2048  # elements per chunk of one program: 16 per thread at 4 warps
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
# 1.5·2^23: adding it to a float32 |v| <= 2^22 leaves a number whose unit in the last place is 1, so the add
# rounds v to an integer (half to even) and subtracting it back is exact. libdevice `rint` would do the
# same but is not available in the CPU interpreter (Triton 3.9, 2026).
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def quantize_rows_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    M,
    K,
    stride_xm,
    LEVELS: tl.constexpr,
    INTEGER: tl.constexpr,
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
    levels = tl.full([ROWS], LEVELS, tl.float32)
    inverse = tl.math.div_rn(levels, amax)
    for start in range(0, K, BLOCK_K):
        columns = start + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (columns < K)[None, :]
        x = tl.load(x_rows + columns[None, :], mask=mask, other=0.0).to(tl.float32)
        quotient = tl.minimum(tl.maximum(x * inverse[:, None], -LEVELS), LEVELS)
        if INTEGER:
            codes = ((quotient + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int8)
        else:
            codes = to_e4m3(quotient, INTERPRET)
        tl.store(code_rows + columns[None, :], codes, mask=mask)
    tl.store(scale_ptr + rows, tl.math.div_rn(amax, levels), mask=row_mask)


def launch_config(columns: int) -> tuple[int, int]:
    """(ROWS, BLOCK_K) for rows of `columns` elements: chunks that divide the row where a power of two
    of at least 256 does (every Wan width: 1536 -> 512, 5120 -> 1024, 8960 -> 256, 13824 -> 512), else
    the row rounded up to a power of two (capped), and as many rows as fill a chunk of TILE_ELEMENTS."""
    lowest_bit = columns & -columns
    block_k = min(lowest_bit, 1024) if lowest_bit >= 256 else min(triton.next_power_of_2(columns), 1024)
    return max(1, TILE_ELEMENTS // block_k), block_k


def quantize_rows(
    x: torch.Tensor, codes_dtype: torch.dtype, levels: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D x with unit column stride -> (codes of `codes_dtype` with x's shape, float32 scale per row =
    amax_r / `levels`): int8 codes are integers in ±levels, any other type gets e4m3 codes."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected a row-major 2-D matrix, got shape {tuple(x.shape)}, strides {x.stride()}")
    rows, columns = x.shape
    if columns > MAX_ROW:
        raise ValueError(f"rows of {columns} elements exceed the kernel's {MAX_ROW}")
    codes = torch.empty(rows, columns, dtype=codes_dtype, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0 or columns == 0:
        return codes, scale
    rows_per_program, block_k = launch_config(columns)
    quantize_rows_kernel[(triton.cdiv(rows, rows_per_program),)](
        x,
        codes,
        scale,
        rows,
        columns,
        x.stride(0),
        LEVELS=float(levels),
        INTEGER=codes_dtype == torch.int8,
        ROWS=rows_per_program,
        BLOCK_K=block_k,
        INTERPRET=interpreting(),
        num_warps=4,
        enable_fp_fusion=False,
    )
    return codes, scale
