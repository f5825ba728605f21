"""Float64 / int64 evaluations of the row-wise W8A8 formulas of KERNELS.md §4.6 (the "fast path") and of the
issue-6 epilogue, written from the spec text for the tests of turbo_kernels/rowwise_gemm.py (never from the
code under test)."""

from __future__ import annotations

import math

import torch
from quant_formulas import dequantize_tiles_f64, round_half_even

INT8_LEVELS = 127.0
AMAX_FLOOR_F32 = float(torch.tensor(1e-8, dtype=torch.float32))


def int8_rows_quantize_f64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: amax = max(1e-8, max|x|) in float32; scale = amax/127 and inverse = 127/amax, each rounded
    once to float32 (division in float64 then rounding is the correctly rounded float32 quotient); the
    product x · inverse rounded to float32; codes = round-half-even of that product, clamped to ±127."""
    amax = x.float().double().abs().amax(dim=1).clamp_min(AMAX_FLOOR_F32)
    scale = (amax / INT8_LEVELS).float().double()
    inverse = (INT8_LEVELS / amax).float().double()
    product = (x.float().double() * inverse[:, None]).float().double()
    return round_half_even(product).clamp(-INT8_LEVELS, INT8_LEVELS), scale


def gelu_tanh_f64(y: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (PyTorch's approximate="tanh"): 0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³)))."""
    return 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3)))


def rowwise_gemm_f64(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact result in float64, magnitude bound of the float32 epilogue's operands). int8 operands are summed
    exactly in int64, e4m3 ones in float64 (their products are exact)."""
    if a.dtype == torch.int8:
        dot = (a.long() @ b.long().T).double()
    else:
        dot = a.double() @ b.double().T
    y = dot * a_scale.double()[:, None] * b_scale.double()[None, :]
    magnitude = (
        (a.double().abs() @ b.double().abs().T) * a_scale.double()[:, None] * b_scale.double()[None, :]
    )
    if bias is not None:
        y = y + bias.double()[None, :]
        magnitude = magnitude + bias.double().abs()[None, :]
    if gelu:
        magnitude = magnitude * 1.2  # the slope of GELU-tanh stays below 1.13
        y = gelu_tanh_f64(y)
    return y, magnitude


def bf16_ulp(y: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers (8 significant bits) at |y|; at zero, that of the smallest normal."""
    exponent = torch.floor(torch.log2(y.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, exponent - 7)


def assert_within_one_bf16_ulp(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> None:
    """got (bf16) is exact rounded to bf16 give or take one ulp of exact, plus float32 rounding of the
    epilogue's operands (a few 2^-24 of their magnitude, which matters where a bias cancels the product)."""
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    error = (got.double() - exact).abs()
    allowed = bf16_ulp(exact) + 2.0**-20 * magnitude
    worst = (error - allowed).argmax()
    assert bool((error <= allowed).all()), (
        f"off by {error.flatten()[worst].item()} at {exact.flatten()[worst].item()} "
        f"(allowed {allowed.flatten()[worst].item()})"
    )


def rows_from_tiles_f64(codes: torch.Tensor, tile_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KERNELS.md §4.6 weight re-quantisation: w = code · s_tile (float32), then the row quantiser."""
    weight = dequantize_tiles_f64(codes, tile_scale).float()
    return int8_rows_quantize_f64(weight)
