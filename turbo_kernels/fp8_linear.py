"""FP8 (e4m3) W8A8 linear: per-output-channel weight scales, per-token activation scales (issue 6, KERNELS.md
§4.6 "fast path" form).

* `quantize_rows_e4m3`: per row r of a 2-D matrix, amax_r = max(1e-8, max|x_r|) in float32, scale_r =
  amax_r/448, code = e4m3(x · (448/amax_r)) (round to nearest even, saturated to ±448; both divisions
  correctly rounded, on every device). Weights [N, K] give one scale per output channel, activations [M, K]
  one per token.
* `fp8_matmul_scaled_mm`: Y = (Xq·Wqᵀ) · sx[m] · sw[n] through `torch._scaled_mm` with row-wise scales
  (cuBLASLt / CUTLASS FP8 tensor cores, float32 accumulation, bf16 output). Needs a GPU with FP8 tensor
  cores (compute capability >= 8.9) and a PyTorch that supports row-wise scaling there; K and N multiples
  of 16.
* `fp8_matmul_reference`: the same product in float32 on any device (e4m3×e4m3 products are exact in
  float32; the sum is float32).
* `fp8_linear`: quantise x per token, multiply, cast to x's dtype, add the bias in that dtype;
  `fp8_linear_quantized` the same from codes and scales quantised beforehand (once for several linears).

Unlike the int8 format, nothing here must match a released checkpoint bit for bit: models are quantised to
fp8 at load time. Accuracy (measured on the CPU, Gaussian x [512, 1536] with and without ×6 outlier
channels, W [1536, 1536], rel-L2 against the float64 product): fp8 0.037, the int8 128×128 tiles 0.013-0.017,
bf16 0.0023. e4m3 keeps 3 mantissa bits, so fp8 is the less accurate of the two quantised paths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .row_quant_reference import quantize_rows_reference

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# torch._scaled_mm needs both the reduction and the output dimension to be multiples of 16.
SCALED_MM_ALIGNMENT = 16
SCALED_MM_MIN_CAPABILITY = (8, 9)


def quantize_rows_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x -> (e4m3 codes with x's shape, float32 scale per row)."""
    return quantize_rows_reference(x, E4M3, E4M3_MAX)


def fp8_matmul_reference(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Xq [M, K] · Wq [N, K]ᵀ · sx[m] · sw[n] in float32, cast to `out_dtype`."""
    product = x_codes.float() @ weight_codes.float().T
    return (product * (x_scale[:, None] * weight_scale[None, :])).to(out_dtype)


def fp8_matmul_scaled_mm(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """As `fp8_matmul_reference` on FP8 tensor cores (`torch._scaled_mm`, row-wise scales); `bias` (in
    `out_dtype`) is added by the GEMM's epilogue before the one rounding to `out_dtype`."""
    return torch._scaled_mm(
        x_codes,
        weight_codes.t(),  # [K, N] column-major, as _scaled_mm requires of its second operand
        scale_a=x_scale[:, None].contiguous(),
        scale_b=weight_scale[None, :].contiguous(),
        bias=bias,
        out_dtype=out_dtype,
    )


def scaled_mm_shape_ok(depth: int, columns: int, out_dtype: torch.dtype) -> bool:
    """Whether `fp8_matmul_scaled_mm` accepts K = depth, N = columns and the output dtype (bf16 only)."""
    aligned = depth % SCALED_MM_ALIGNMENT == 0 and columns % SCALED_MM_ALIGNMENT == 0
    return aligned and out_dtype == torch.bfloat16


def fp8_linear(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    use_scaled_mm: bool,
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    bias_in_gemm: bool = False,
) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: per-token e4m3 quantisation (`quantize`, default
    `quantize_rows_e4m3`; `fp8_quant` has the same in Triton), FP8 matmul, then `+ bias`."""
    x_codes, x_scale = (quantize or quantize_rows_e4m3)(x)
    return fp8_linear_quantized(
        x_codes, x_scale, x.dtype, weight_codes, weight_scale, bias, use_scaled_mm, bias_in_gemm
    )


def fp8_linear_quantized(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    out_dtype: torch.dtype,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    use_scaled_mm: bool,
    bias_in_gemm: bool = False,
) -> torch.Tensor:
    """`fp8_linear` of activations already quantised per token (codes [M, K], scales [M]), e.g. once for
    several linears reading the same input; `out_dtype` is the dtype x had.

    `bias_in_gemm`: on the `_scaled_mm` path, add the bias in the GEMM's epilogue (one rounding instead of
    two; a separate broadcast add cost 0.16 ms per linear at 1.3B-480p on an H200, more than a quarter of the
    fp8 GEMM time). Only where the caller checked that this PyTorch build accepts a bias there."""
    if use_scaled_mm and scaled_mm_shape_ok(x_codes.shape[1], weight_codes.shape[0], out_dtype):
        if bias_in_gemm and bias is not None:
            bias = bias.to(out_dtype)
            return fp8_matmul_scaled_mm(x_codes, x_scale, weight_codes, weight_scale, out_dtype, bias)
        out = fp8_matmul_scaled_mm(x_codes, x_scale, weight_codes, weight_scale, out_dtype)
    else:
        out = fp8_matmul_reference(x_codes, x_scale, weight_codes, weight_scale, out_dtype)
    return out if bias is None else out + bias.to(out.dtype)
