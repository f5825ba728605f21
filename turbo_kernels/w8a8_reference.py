"""Exact W8A8 int8 linear in TurboDiffusion's `-quant` format, in plain PyTorch (TURBODIFFUSION.md §11,
KERNELS.md §1.7).

* `quantize_tiles`: the quantiser used for weights (offline) and activations (at run time). Per 128×128 tile
  of a 2-D matrix (zero-filled outside it): amax = max(1e-8, max|x|) in float32, q = x·(128/amax) rounded to
  nearest even and saturated to [−128, 127] (so +amax becomes 127 and −amax −128), scale = amax/128.
* `w8a8_matmul`: Y[m, n] = Σ_kb fp32(Σ_{k∈kb} Xq[m,k]·Wq[n,k]) · (sx[m//128, kb] · sw[n//128, kb]), one
  integer partial sum per 128-wide K block, accumulated in float32 in K-block order, then cast to the output
  dtype.
* `w8a8_linear`: quantise the activations, multiply, cast to the activation dtype, then add the bias in
  that dtype (a bf16 add for bf16 activations), as the reference `Int8Linear.forward`.

Why it is exact: an int8 product is at most 2^14 in magnitude and a K block sums 128 of them, so every partial
sum is an integer below 2^21 < 2^24. A float32 matmul of int8-valued operands over one K block therefore
gives the exact integer sum whatever the BLAS summation order (and int8 values survive TF32 or bf16 input
rounding, having at most 8 significant bits). Only the final float32 accumulation rounds, in the order the
reference kernel uses. The float32 accumulate is a multiply then an add (the GPU kernels may fuse them into
one FMA, which moves results by at most one float32 rounding before the cast to bf16).

Torch only, so it runs wherever PyTorch does: `Int8Linear` uses it where the Triton kernel
(`int8_gemm.py`) cannot run, and that kernel's tests use it as their reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TILE = 128
AMAX_FLOOR = 1e-8
# The quantiser divides by 128 (not 127): +amax maps to 128 and saturates to 127.
QUANT_LEVELS = 128.0
INT8_MIN, INT8_MAX = -128, 127


def tile_grid(rows: int, columns: int) -> tuple[int, int]:
    """Shape of the scale tensor of a (rows, columns) matrix: (⌈rows/128⌉, ⌈columns/128⌉)."""
    return math.ceil(rows / TILE), math.ceil(columns / TILE)


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x -> (int8 codes with x's shape, float32 scales of shape `tile_grid(*x.shape)`)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_tiles takes a 2-D matrix, got shape {tuple(x.shape)}")
    rows, columns = x.shape
    tile_rows, tile_columns = tile_grid(rows, columns)
    padded = F.pad(x.float(), (0, tile_columns * TILE - columns, 0, tile_rows * TILE - rows))
    tiles = padded.view(tile_rows, TILE, tile_columns, TILE)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)
    multiplier = (QUANT_LEVELS / amax)[:, None, :, None]
    codes = torch.round(tiles * multiplier).clamp_(INT8_MIN, INT8_MAX).to(torch.int8)
    codes = codes.view(tile_rows * TILE, tile_columns * TILE)[:rows, :columns].contiguous()
    return codes, amax / QUANT_LEVELS


def dequantize_tiles(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W[i, j] = codes[i, j] · scale[i // 128, j // 128] (in float32), returned in `dtype`."""
    rows, columns = codes.shape
    per_element = scale.repeat_interleave(TILE, 0)[:rows].repeat_interleave(TILE, 1)[:, :columns]
    return (codes.to(torch.float32) * per_element.to(torch.float32)).to(dtype)


def w8a8_matmul(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Xq [M, K] (int8) · Wq [N, K]ᵀ (int8) with per-tile scales -> [M, N] in `out_dtype`, no bias."""
    rows, depth = x_codes.shape
    columns = weight_codes.shape[0]
    if weight_codes.shape[1] != depth:
        raise ValueError(f"activations have {depth} features but the weight expects {weight_codes.shape[1]}")
    acc = torch.zeros(rows, columns, dtype=torch.float32, device=x_codes.device)
    for block in range(math.ceil(depth / TILE)):
        depth_slice = slice(block * TILE, (block + 1) * TILE)
        partial = x_codes[:, depth_slice].float() @ weight_codes[:, depth_slice].float().T
        row_scale = x_scale[:, block].repeat_interleave(TILE)[:rows]
        column_scale = weight_scale[:, block].repeat_interleave(TILE)[:columns]
        acc += partial * (row_scale[:, None] * column_scale[None, :])
    return acc.to(out_dtype)


def w8a8_linear(
    x: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: quantise x per tile, W8A8 matmul, then `+ bias` in x's dtype."""
    x_codes, x_scale = quantize_tiles(x)
    out = w8a8_matmul(x_codes, x_scale, weight_codes, weight_scale, x.dtype)
    return out if bias is None else out + bias.to(out.dtype)
