"""Cases for the row-wise W8A8 Triton kernels (`turbo_kernels/rowwise_gemm.py`) on the CPU interpreter, judged
by the formulas of tests/rowwise_formulas.py: the int8 GEMM against an int64 sum scaled in float64 (one bf16
ulp), the fp8 GEMM against float64, the int8 row quantiser bit for bit. Both load paths run: TMA descriptors
(shapes with 16-byte aligned rows) and pointer loads (ragged K or N, or `descriptors=False`). Small tiles so
that ragged tails, several K steps and several tiles per persistent program occur at small sizes.

Collected only by tests/test_rowwise_gemm_interpret.py (child pytest with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from rowwise_formulas import assert_within_one_bf16_ulp, int8_rows_quantize_f64, rowwise_gemm_f64
from triton_children import interpreted_kernels

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture(scope="module")
def kernels():
    return interpreted_kernels("rowwise_gemm", "test_rowwise_gemm_interpret.py")


def _operands(dtype: torch.dtype, rows: int, columns: int, depth: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (rows, depth), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (columns, depth), generator=g, dtype=torch.int8)
        a[0] = 127  # one all-maximal row: the largest sums the format allows at this K
        b[0] = -127
    else:
        a = (torch.randn(rows, depth, generator=g) * 40).clamp(-448, 448).to(dtype)
        b = (torch.randn(columns, depth, generator=g) * 40).clamp(-448, 448).to(dtype)
    # Scales that spread the results over about ±6, where GELU is far from linear.
    spread = (depth**0.5 * (5376.0 if dtype == torch.int8 else 1600.0) / 3.0) ** -0.5
    a_scale = (torch.rand(rows, generator=g) + 0.5) * spread
    b_scale = (torch.rand(columns, generator=g) + 0.5) * spread
    bias = (torch.randn(columns, generator=g) * 2.0).to(torch.bfloat16)
    return a, a_scale, b, b_scale, bias


# (M, N, K, descriptors usable): N % 8 and K % 16 decide whether the rows are 16-byte aligned; with 32-wide
# tiles every shape has M and N tails, and K tails where K % 32 != 0 (zero-filled by TMA or masked).
SHAPES = [(70, 56, 96, True), (37, 50, 90, False), (45, 48, 80, True), (9, 24, 40, False)]


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize(("rows", "columns", "depth", "aligned"), SHAPES)
@pytest.mark.parametrize(("with_bias", "gelu"), [(False, False), (True, False), (True, True)])
def test_gemm_follows_the_formula(kernels, dtype, rows, columns, depth, aligned, with_bias, gelu):
    a, a_scale, b, b_scale, bias = _operands(dtype, rows, columns, depth, seed=rows + depth)
    bias = bias if with_bias else None
    config = kernels.RowwiseGemmConfig(block_m=32, block_n=32, block_k=32, group_m=2)
    out = kernels.rowwise_matmul(a, a_scale, b, b_scale, bias, gelu, config)
    assert kernels.descriptors_usable(a, b, out) == aligned
    exact, magnitude = rowwise_gemm_f64(a, a_scale, b, b_scale, bias, gelu)
    assert_within_one_bf16_ulp(out, exact, magnitude)


@pytest.mark.parametrize(
    "config",
    [
        dict(block_m=64, block_n=32, block_k=64, group_m=1, descriptors=False, flatten=False),
        dict(block_m=32, block_n=64, block_k=32, group_m=3, split_epilogue=False),
        dict(block_m=16, block_n=32, block_k=16, group_m=8, programs_per_sm=2),
    ],
)
def test_other_tile_shapes_and_paths(kernels, config):
    a, a_scale, b, b_scale, bias = _operands(torch.int8, 100, 72, 112, seed=3)
    out = kernels.rowwise_matmul(a, a_scale, b, b_scale, bias, True, kernels.RowwiseGemmConfig(**config))
    exact, magnitude = rowwise_gemm_f64(a, a_scale, b, b_scale, bias, True)
    assert_within_one_bf16_ulp(out, exact, magnitude)


def _activations(rows: int, columns: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=g) * torch.logspace(-3, 2, columns)
    x[1] = 0.0  # an all-zero row: amax takes the floor 1e-8
    x[2, 3] = 3.0e4  # one outlier: the rest of its row rounds to small codes
    x[3] = x[3].clamp(-1.0, 1.0)
    x[3, 0] = 127.0  # amax 127: inverse 1, so the halves below are exact ties
    x[3, 1:5] = torch.tensor([2.5, -3.5, 0.5, -126.5])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "columns"), [(7, 300), (5, 1536), (4, 5), (4, 17000)])
def test_int8_row_quantiser_is_the_formula_bit_for_bit(kernels, rows, columns, dtype):
    x = _activations(rows, columns, dtype)
    codes, scale = kernels.quantize_rows_int8_triton(x)
    expected_codes, expected_scale = int8_rows_quantize_f64(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(codes.double(), expected_codes) and torch.equal(scale.double(), expected_scale)
    if columns >= 5:
        assert codes[3, :5].tolist() == [127, 2, -4, 0, -126]  # ties to even
    reference_codes, reference_scale = kernels.quantize_rows_int8(x)
    assert torch.equal(codes, reference_codes) and torch.equal(scale, reference_scale)


@pytest.mark.parametrize("weight_dtype", [torch.int8, torch.float8_e4m3fn])
def test_linear_quantises_tokens_then_multiplies(kernels, weight_dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 21, 96, generator=g) * 3).to(torch.bfloat16)
    w = torch.randn(40, 96, generator=g) / 10
    if weight_dtype == torch.int8:
        codes, scale = kernels.quantize_rows_int8(w)
        x_codes, x_scale = int8_rows_quantize_f64(x.reshape(-1, 96))
        x_codes = x_codes.to(torch.int8)
    else:
        from comfyui_turbodiffusion.turbo_kernels.fp8_linear import quantize_rows_e4m3
        from quant_formulas import fp8_rows_quantize_f64

        codes, scale = quantize_rows_e4m3(w)
        x_codes, x_scale = fp8_rows_quantize_f64(x.reshape(-1, 96))
        x_codes = x_codes.to(weight_dtype)
    bias = torch.randn(40, generator=g).to(torch.bfloat16)
    config = kernels.RowwiseGemmConfig(block_m=32, block_n=32, block_k=32)
    out = kernels.rowwise_linear(x, codes, scale, bias, gelu=True, config=config)
    assert out.shape == (2, 21, 40)
    exact, magnitude = rowwise_gemm_f64(x_codes, x_scale.float(), codes, scale, bias, True)
    assert_within_one_bf16_ulp(out.reshape(-1, 40), exact, magnitude)


def test_refusals(kernels):
    a, a_scale, b, b_scale, _ = _operands(torch.int8, 8, 16, 32, seed=1)
    with pytest.raises(ValueError, match="both be int8 or both float8_e4m3fn"):
        kernels.rowwise_matmul(a, a_scale, b.to(torch.float32), b_scale)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.rowwise_matmul(a.t().contiguous().t(), a_scale, b, b_scale)
    with pytest.raises(ValueError, match="a_scale must be a contiguous float32 vector of 8"):
        kernels.rowwise_matmul(a, a_scale[:4], b, b_scale)
    with pytest.raises(ValueError, match=r"expected A \[M, K\] and B \[N, K\]"):
        kernels.rowwise_matmul(a, a_scale, b[:, :16], b_scale)
    with pytest.raises(ValueError, match="row-major"):
        kernels.quantize_rows_int8_triton(torch.randn(8, 6).t())
