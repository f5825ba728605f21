"""The PyTorch side of turbo_kernels/rowwise_gemm.py, judged by tests/rowwise_formulas.py: the row quantiser,
the re-quantisation of a `-quant` tile weight to per-output-channel int8 with its reported error, the
float64 reference product, and the per-architecture default configs."""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.turbo_kernels import rowwise_gemm
from quant_formulas import dequantize_tiles_f64, int8_tile_quantize_f64
from rowwise_formulas import (
    assert_within_one_bf16_ulp,
    int8_rows_quantize_f64,
    rows_from_tiles_f64,
    rowwise_gemm_f64,
)


def _tile_weight(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * torch.logspace(-1, 1, columns)  # tiles of different ranges
    codes, scale = int8_tile_quantize_f64(w.to(torch.bfloat16))
    return codes.to(torch.int8), scale.float()


def test_row_quantiser_is_the_formula():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(33, 700, generator=g) * torch.logspace(-4, 3, 700)).to(torch.bfloat16)
    x[4] = 0.0
    codes, scale = rowwise_gemm.quantize_rows_int8(x)
    expected_codes, expected_scale = int8_rows_quantize_f64(x)
    assert torch.equal(codes.double(), expected_codes) and torch.equal(scale.double(), expected_scale)


@pytest.mark.parametrize(("rows", "columns"), [(200, 300), (128, 1536), (5, 130)])
def test_requantisation_follows_the_spec_and_reports_its_error(rows, columns):
    codes, tile_scale = _tile_weight(rows, columns, seed=rows)
    weight = rowwise_gemm.requantize_tiles_to_rows(codes, tile_scale)
    expected_codes, expected_scale = rows_from_tiles_f64(codes, tile_scale)
    assert weight.codes.dtype == torch.int8 and weight.scale.shape == (rows,)
    assert torch.equal(weight.codes.double(), expected_codes)
    assert torch.equal(weight.scale.double(), expected_scale)

    tiles = dequantize_tiles_f64(codes, tile_scale)
    difference = expected_codes * expected_scale[:, None] - tiles
    expected_error = (difference.norm() / tiles.norm()).item()
    tile_ratios = [
        (difference[i : i + 128, j : j + 128].norm() / tiles[i : i + 128, j : j + 128].norm()).item()
        for i in range(0, rows, 128)
        for j in range(0, columns, 128)
    ]
    assert weight.relative_error == pytest.approx(expected_error, rel=1e-4)
    assert weight.worst_tile_error == pytest.approx(max(tile_ratios), rel=1e-4)
    assert 0.001 < weight.relative_error < 0.03  # one more int8 rounding of Gaussian rows: about 1 %


def test_a_row_dominated_by_one_tile_shows_in_the_worst_tile_error():
    codes, tile_scale = _tile_weight(128, 512, seed=7)
    tile_scale[0, 0] *= 1000.0  # one tile 1000x larger: its rows' other tiles round to almost nothing
    weight = rowwise_gemm.requantize_tiles_to_rows(codes, tile_scale)
    assert weight.worst_tile_error > 0.5
    assert weight.relative_error < 0.05  # the matrix-wide ratio hides it


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("gelu", [False, True])
def test_reference_product_is_the_formula(dtype, gelu):
    g = torch.Generator().manual_seed(3)
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (20, 64), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8)
    else:
        a = (torch.randn(20, 64, generator=g) * 30).to(dtype)
        b = (torch.randn(24, 64, generator=g) * 30).to(dtype)
    a_scale, b_scale = torch.rand(20, generator=g) * 1e-3, torch.rand(24, generator=g) * 1e-3
    bias = torch.randn(24, generator=g).to(torch.bfloat16)
    out = rowwise_gemm.rowwise_matmul_reference(a, a_scale, b, b_scale, bias, gelu)
    exact, magnitude = rowwise_gemm_f64(a, a_scale, b, b_scale, bias, gelu)
    assert_within_one_bf16_ulp(out, exact, magnitude)


def test_default_configs_per_architecture():
    hopper_int8 = rowwise_gemm.DEFAULT_CONFIGS["hopper"][torch.int8]
    assert rowwise_gemm.architecture_family((9, 0)) == "hopper" and hopper_int8.descriptors
    assert rowwise_gemm.architecture_family((8, 0)) == "ampere"
    assert {rowwise_gemm.architecture_family(c) for c in ((8, 6), (8, 9), (12, 0))} == {"consumer"}
    for family in ("ampere", "consumer"):
        assert not any(config.descriptors for config in rowwise_gemm.DEFAULT_CONFIGS[family].values())
    assert rowwise_gemm.default_config(torch.device("cpu"), torch.int8) == hopper_int8
    assert not rowwise_gemm.rowwise_gemm_supported(torch.device("cpu"), torch.int8)  # no interpreter here
