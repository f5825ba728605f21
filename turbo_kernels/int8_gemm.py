"""Triton W8A8 int8 linear for TurboDiffusion's `-quant` checkpoints (TURBODIFFUSION.md §11, KERNELS.md §1.7,
§4.6).

Computes exactly what `w8a8_reference.w8a8_linear` computes, in two kernels:

* `quantize_tiles_triton`: one program per 128×128 tile of X [M, K] (bf16 / fp16 / fp32, row-major):
  amax = max(1e-8, max|x|) in fp32, q = x·(128/amax) (correctly rounded division) rounded half-to-even and
  saturated to [−128, 127], scale = amax/128. Writes int8 [M, K] and fp32 scales [⌈M/128⌉, ⌈K/128⌉]. One
  read of X and one int8 write: ≈ 3 bytes per element, so cheap next to the GEMM (KERNELS.md §4.6).
* `w8a8_matmul_triton`: Y [M, N] = Σ_kb fp32(int32 dot of one 128-wide K block) · (sx·sw) + bias.
  A (M×K) and W (N×K) both K-contiguous, BLOCK_K = 128 = the scale tile, and BLOCK_M, BLOCK_N divide 128, so
  each K step of an output tile is one int32 `tl.dot` (IMMA / IGMMA), one scalar scale product and one
  fp32 multiply-accumulate, exactly the reference kernel's per-block dequantisation; grouped tile order for
  L2 reuse. Epilogue: cast to the output dtype (the activation dtype), then the bias added in fp32 and
  rounded again, which equals the reference's separate bf16 add.

Contract: 2-D contiguous inputs; int8_weight [N, K] int8; weight scale [⌈N/128⌉, ⌈K/128⌉] fp32; bias [N] or
None. Any M, N, K (tails are masked and read as zeros, exactly the quantiser's zero fill; the reference CUDA
kernel instead requires K % 128 == 0, which every Wan layer meets). Offsets are int64.

GPUs: CUDA with compute capability >= 8.0 (int8 `tl.dot`: IMMA on sm80/86/89/120, IGMMA on sm90 — KERNELS.md
§4.8). Pointer loads, no tensor descriptors.

Tested: tests/test_quant_triton_interpret.py runs both kernels under TRITON_INTERPRET=1 (the interpreter
computes int8 dots exactly) against the PyTorch reference and a float64 evaluation of the spec formula,
with ragged M/N/K. GPU numerics and speed are not tested here (no GPU in CI); `Int8Linear` checks this
kernel against the reference on first use per device and falls back if they disagree; tests/test_quant_gpu.py
and bench/memory.py cover the GPU.
Compile-only check (Triton 3.9, ptxas of its wheel, 2026; pointers and M/N/K specialised as divisible by 16,
as the launcher does for real tensors): the default 128×128 tile, 8 warps, 3 stages is software-pipelined
(cp.async), uses 168-170 registers and 64 KB of shared memory on sm80/86/89, 200 registers and 96 KB with
wgmma on sm90, no spills; 4 warps on a 128×128 tile spill, 64-wide tiles with 4 warps do not. The config
is the reference kernel's tile shape and has not been tuned on a GPU (bench/memory.py sweeps a few).

Notes: rounding uses the 1.5·2^23 trick ((v + c) − c rounds |v| <= 2^22 to nearest even) because libdevice
`rint` is not available in the interpreter (Triton 3.9, 2026); the quantiser is launched with
`enable_fp_fusion=False` so that `x·m + c` is not contracted into an FMA, which would round the product
and the sum once instead of twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .interpreter import interpreting
from .w8a8_reference import AMAX_FLOOR, QUANT_LEVELS, TILE, tile_grid

# 1.5·2^23: adding it to a float32 |v| <= 2^22 leaves a number whose unit in the last place is 1, so the add
# rounds v to an integer (half to even) and subtracting it back is exact.
ROUND_MAGIC = tl.constexpr(12582912.0)
# Triton kernels may only read module constants declared as constexpr.
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_QUANT_LEVELS = tl.constexpr(QUANT_LEVELS)
_INVERSE_LEVELS = tl.constexpr(1.0 / QUANT_LEVELS)  # 2^-7: multiplying by it is exact


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch of `w8a8_matmul_triton`. `bit_convert` turns each K block's int32 sum into
    float32 with `int32_to_float_exact` (an integer add and a float subtract) instead of the I2F conversion
    instruction, which runs at a quarter of the float32 rate on sm80-sm90; same result bit for bit."""

    block_m: int = 128
    block_n: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    bit_convert: bool = False


DEFAULT_CONFIG = GemmConfig()


@triton.jit
def _quantize_tiles_kernel(
    x_ptr, codes_ptr, scale_ptr, M, K, stride_xm, scale_columns, TILE_SIZE: tl.constexpr
):
    tile_m = tl.program_id(0)
    tile_k = tl.program_id(1)
    rows = tile_m * TILE_SIZE + tl.arange(0, TILE_SIZE)
    columns = tile_k * TILE_SIZE + tl.arange(0, TILE_SIZE)
    mask = (rows[:, None] < M) & (columns[None, :] < K)
    offsets = rows[:, None].to(tl.int64) * stride_xm + columns[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), _AMAX_FLOOR)
    # Triton's "/" is an approximate division on the GPU; div_rn is correctly rounded, like the reference.
    scaled = x * tl.math.div_rn(tl.full((), _QUANT_LEVELS, tl.float32), amax)
    rounded = (scaled + ROUND_MAGIC) - ROUND_MAGIC
    codes = tl.minimum(tl.maximum(rounded, -128.0), 127.0).to(tl.int8)
    code_offsets = rows[:, None].to(tl.int64) * K + columns[None, :]
    tl.store(codes_ptr + code_offsets, codes, mask=mask)
    tl.store(scale_ptr + tile_m * scale_columns + tile_k, amax * _INVERSE_LEVELS)


@triton.jit
def _cast(x, dtype: tl.constexpr, SOFTWARE_BF16: tl.constexpr):
    """fp32 -> dtype. SOFTWARE_BF16 first rounds x onto the bf16 grid (half to even) with integer ops, for the
    CPU interpreter, whose fp32 -> bf16 cast truncates (Triton 3.9, seen 2026); the cast is then exact."""
    if SOFTWARE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


# Bit pattern of the float32 1.5·2^23: an int32 |v| <= 2^22 added to it gives the bits of 1.5·2^23 + v.
_FLOAT_MAGIC_BITS = tl.constexpr(0x4B400000)


@triton.jit
def int32_to_float_exact(v):
    """float32(v) for an int32 tensor with |v| <= 2^22 (one 128-wide int8 dot: |v| <= 2^21), without the
    conversion instruction: reinterpret the bits of 1.5·2^23 + v (whose unit in the last place is 1), then
    subtract 1.5·2^23, which is exact."""
    return (v + _FLOAT_MAGIC_BITS).to(tl.float32, bitcast=True) - ROUND_MAGIC


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr,
    w_ptr,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_tiles,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BIT_CONVERT: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles share the W tiles they read while those are in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns read valid memory (wrapped) and are never stored.
    safe_m = (offs_m % M).to(tl.int64)
    safe_n = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + safe_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + safe_n[:, None] * K + offs_k[None, :]
    # BLOCK_K is the 128-wide scale tile and BLOCK_M, BLOCK_N divide it, so one activation scale and one
    # weight scale cover the whole output tile at each K step: two scalar loads, one scalar product.
    tl.static_assert(BLOCK_K % BLOCK_M == 0 and BLOCK_K % BLOCK_N == 0)
    a_scale_row = a_scale_ptr + ((pid_m * BLOCK_M) // BLOCK_K).to(tl.int64) * k_tiles
    w_scale_row = w_scale_ptr + ((pid_n * BLOCK_N) // BLOCK_K).to(tl.int64) * k_tiles

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_tiles):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            in_k = offs_k[None, :] < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=in_k, other=0)
            w = tl.load(w_ptrs, mask=in_k, other=0)
        partial = tl.dot(a, tl.trans(w))  # int32: exact sum of one 128-wide K block
        scale = tl.load(a_scale_row + kb) * tl.load(w_scale_row + kb)
        acc += (int32_to_float_exact(partial) if BIT_CONVERT else partial.to(tl.float32)) * scale
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    out_dtype = out_ptr.dtype.element_ty
    out = _cast(acc, out_dtype, SOFTWARE_BF16)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + safe_n).to(tl.float32)
        out = _cast(out.to(tl.float32) + bias[None, :], out_dtype, SOFTWARE_BF16)
    out_offsets = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + out_offsets, out, mask=out_mask)


def quantize_tiles_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x -> (int8 codes, fp32 per-tile scales); same result as `w8a8_reference.quantize_tiles`."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected a row-major 2-D matrix, got shape {tuple(x.shape)}, strides {x.stride()}")
    rows, columns = x.shape
    grid = tile_grid(rows, columns)
    codes = torch.empty(rows, columns, dtype=torch.int8, device=x.device)
    scale = torch.empty(grid, dtype=torch.float32, device=x.device)
    if rows == 0 or columns == 0:
        return codes, scale
    _quantize_tiles_kernel[grid](
        x, codes, scale, rows, columns, x.stride(0), grid[1], TILE, num_warps=8, enable_fp_fusion=False
    )
    return codes, scale


def w8a8_matmul_triton(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """Xq [M, K] · Wq [N, K]ᵀ with per-tile scales, + bias, in `out_dtype` ([M, N])."""
    rows, depth = x_codes.shape
    columns = weight_codes.shape[0]
    if weight_codes.shape[1] != depth:
        raise ValueError(f"activations have {depth} features but the weight expects {weight_codes.shape[1]}")
    if TILE % config.block_m or TILE % config.block_n:
        raise ValueError(f"block_m and block_n must divide {TILE}, got {config.block_m} and {config.block_n}")
    tensors = (x_codes, x_scale, weight_codes, weight_scale)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("codes and scales must be contiguous")
    out = torch.empty(rows, columns, dtype=out_dtype, device=x_codes.device)
    if rows == 0:
        return out
    grid = (triton.cdiv(rows, config.block_m) * triton.cdiv(columns, config.block_n),)
    _w8a8_gemm_kernel[grid](
        x_codes,
        weight_codes,
        x_scale,
        weight_scale,
        bias if bias is not None else out,
        out,
        rows,
        columns,
        depth,
        triton.cdiv(depth, TILE),
        HAS_BIAS=bias is not None,
        EVEN_K=depth % TILE == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=TILE,
        GROUP_M=config.group_m,
        BIT_CONVERT=config.bit_convert,
        SOFTWARE_BF16=out_dtype == torch.bfloat16 and interpreting(),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def w8a8_linear_triton(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemmConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: tile-quantise x, W8A8 GEMM, bias; as `w8a8_reference.w8a8_linear`."""
    x_codes, x_scale = quantize_tiles_triton(x.contiguous())
    return w8a8_matmul_triton(x_codes, x_scale, weight_codes, weight_scale, bias, x.dtype, config)
