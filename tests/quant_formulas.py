"""Float64 evaluations of the quantised-linear formulas, written from the spec text for the tests (never from
the code under test): TURBODIFFUSION.md §11.1-11.3 for int8 W8A8, the issue-6 fp8 recipe (per-channel weight
scale, per-token activation scale, e4m3 with round-to-nearest-even) for fp8."""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
E4M3_MIN_NORMAL_EXPONENT = -6
E4M3_MANTISSA_BITS = 3


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the nearest integer, ties to the even one (written out, not torch.round)."""
    floor = torch.floor(x)
    fraction = x - floor
    up = (fraction > 0.5) | ((fraction == 0.5) & (torch.remainder(floor, 2) == 1))
    return floor + up.to(x.dtype)


def int8_tile_quantize_f64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """§11.1 per 128x128 tile (zero outside the matrix): amax = max(1e-8, max|x|), q = sat(rne(x·(128/amax))),
    scale = amax/128. The spec evaluates amax, 128/amax and the product in float32 (an exact tie such as
    −3.5 can become −3.4999998 there, which rounds to −3, not −4), so those two roundings are reproduced;
    the rounding to integers, the saturation and the scales are computed in float64."""
    rows, columns = x.shape
    x = x.double()
    tile_rows, tile_columns = math.ceil(rows / 128), math.ceil(columns / 128)
    codes = torch.empty(rows, columns, dtype=torch.float64)
    scale = torch.empty(tile_rows, tile_columns, dtype=torch.float64)
    for i in range(tile_rows):
        for j in range(tile_columns):
            tile = x[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            amax = max(tile.abs().max().item(), float(torch.tensor(1e-8, dtype=torch.float32)))
            multiplier = torch.tensor(128 / amax, dtype=torch.float32)
            product = (tile.float() * multiplier).double()
            codes[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = round_half_even(product).clamp(
                -128, 127
            )
            scale[i, j] = amax / 128
    return codes, scale


def w8a8_f64(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """§11.2 in float64: Y[m,n] = Σ_kb (Σ_{k∈kb} Xq[m,k]·Wq[n,k]) · sx[m//128,kb] · sw[n//128,kb]."""
    rows, depth = x_codes.shape
    columns = w_codes.shape[0]
    out = torch.zeros(rows, columns, dtype=torch.float64)
    for block in range(math.ceil(depth / 128)):
        k = slice(block * 128, (block + 1) * 128)
        partial = x_codes[:, k].double() @ w_codes[:, k].double().T
        sx = x_scale[:, block].double().repeat_interleave(128)[:rows]
        sw = w_scale[:, block].double().repeat_interleave(128)[:columns]
        out += partial * sx[:, None] * sw[None, :]
    return out


def dequantize_tiles_f64(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FORMATS.md §1.5: W[i, j] = codes[i, j] · scale[i // 128, j // 128], in float64."""
    rows, columns = codes.shape
    per_element = scale.double().repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :columns]
    return codes.double() * per_element


def int8_linear_f64(
    x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """§11.3: quantise x, W8A8 product (float64), round to x's dtype, add the bias in x's dtype."""
    x_codes, x_scale = int8_tile_quantize_f64(x)
    out = w8a8_f64(x_codes, x_scale, w_codes, w_scale).to(x.dtype)
    return out if bias is None else (out.double() + bias.double()).to(x.dtype)


def e4m3_round_f64(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|v| <= 448) onto the float8 e4m3 grid, nearest even: quantum 2^(e-3) for
    |v| in [2^e, 2^(e+1)), 2^-9 for subnormals."""
    magnitude = v.abs()
    exponent = torch.floor(torch.log2(magnitude.clamp_min(2.0**E4M3_MIN_NORMAL_EXPONENT)))
    quantum = torch.pow(2.0, exponent - E4M3_MANTISSA_BITS)
    return (round_half_even(v / quantum) * quantum).clamp(-E4M3_MAX, E4M3_MAX)


def fp8_rows_quantize_f64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: scale = max(1e-8, amax)/448 and the product x · (448/amax), each rounded once to float32 (the
    stored scale and the documented product), then e4m3 rounding of that product in float64."""
    amax = x.double().abs().amax(dim=1).clamp_min(1e-8).float().double()
    scale = (amax / E4M3_MAX).float().double()
    inverse = (E4M3_MAX / amax).float().double()
    product = (x.double() * inverse[:, None]).float().double()
    return e4m3_round_f64(product.clamp(-E4M3_MAX, E4M3_MAX)), scale


def fp8_linear_f64(
    x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    x_codes, x_scale = fp8_rows_quantize_f64(x)
    out = (x_codes @ w_codes.double().T) * x_scale[:, None] * w_scale.double()[None, :]
    out = out.to(x.dtype)
    return out if bias is None else (out.double() + bias.double()).to(x.dtype)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
