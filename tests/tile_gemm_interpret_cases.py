"""Cases for `rowwise_gemm.tile_scaled_matmul` (the exact `-quant` int8 product on the persistent kernel) on
the CPU interpreter, judged by the PyTorch path `w8a8_reference.w8a8_matmul` / `w8a8_linear`: within one ulp
of the output dtype (a GPU may fuse each K block's multiply-add), with ragged M and N, several K blocks,
with and without bias, bf16 / fp16 / fp32 outputs, TMA descriptors and pointer loads.

Collected only by tests/test_tile_gemm_interpret.py (child pytest with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.turbo_kernels import w8a8_reference
from triton_children import interpreted_kernels


@pytest.fixture(scope="module")
def kernels():
    return interpreted_kernels("rowwise_gemm", "test_tile_gemm_interpret.py")


@pytest.fixture(scope="module")
def int8_gemm():
    return interpreted_kernels("int8_gemm", "test_tile_gemm_interpret.py")


def _inputs(rows: int, columns: int, depth: int, seed: int) -> tuple[torch.Tensor, ...]:
    """bf16 activations whose 128×128 tiles have different ranges, a float32 weight, a bf16 bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, depth, generator=g) * torch.logspace(-1, 1, depth)
    x[:5, :128] *= 50.0  # one activation tile far larger than the rest
    w = torch.randn(columns, depth, generator=g) * torch.logspace(0, -2, columns)[:, None] / depth**0.5
    bias = torch.randn(columns, generator=g).to(torch.bfloat16)
    return x.to(torch.bfloat16), w, bias


def _assert_within_one_ulp(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    finfo = torch.finfo(expected.dtype)
    magnitude = expected.double().abs().clamp_min(finfo.tiny)
    ulp = torch.pow(2.0, torch.floor(torch.log2(magnitude))) * finfo.eps
    error = (got.double() - expected.double()).abs()
    worst = (error - ulp).argmax()
    assert bool((error <= ulp).all()), (
        f"off by {error.flatten()[worst].item()} at {expected.flatten()[worst].item()}"
    )


# (M, N, K): ragged M and N (tails in the last row and column tiles), K a multiple of the 128-wide block.
SHAPES = [(200, 136, 256), (130, 131, 384), (70, 260, 128), (257, 40, 512)]


@pytest.mark.parametrize(("rows", "columns", "depth"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_matches_the_reference(kernels, int8_gemm, rows, columns, depth, with_bias):
    x, w, bias = _inputs(rows, columns, depth, seed=rows + columns)
    x_codes, x_scale = int8_gemm.quantize_tiles_triton(x)
    w_codes, w_scale = w8a8_reference.quantize_tiles(w)
    bias = bias if with_bias else None
    out = kernels.tile_scaled_matmul(x_codes, x_scale, w_codes, w_scale, bias, torch.bfloat16)
    assert kernels.descriptors_usable(x_codes, w_codes, out) == (columns % 8 == 0)
    expected = w8a8_reference.w8a8_matmul(x_codes, x_scale, w_codes, w_scale, torch.bfloat16)
    if bias is not None:
        expected = expected + bias
    _assert_within_one_ulp(out, expected)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_other_output_dtypes(kernels, out_dtype, with_bias):
    x, w, bias = _inputs(150, 132, 256, seed=9)
    x_codes, x_scale = w8a8_reference.quantize_tiles(x)
    w_codes, w_scale = w8a8_reference.quantize_tiles(w)
    bias = bias.to(out_dtype) if with_bias else None
    out = kernels.tile_scaled_matmul(x_codes, x_scale, w_codes, w_scale, bias, out_dtype)
    expected = w8a8_reference.w8a8_matmul(x_codes, x_scale, w_codes, w_scale, out_dtype)
    _assert_within_one_ulp(out, expected if bias is None else expected + bias)


@pytest.mark.parametrize(
    "config",
    [
        dict(block_n=128, descriptors=False, flatten=False, split_epilogue=False),
        dict(block_m=64, block_n=128, group_m=1, num_warps=4, programs_per_sm=2),
        dict(block_m=128, block_n=64, group_m=3, split_epilogue=False),
    ],
)
def test_other_launches(kernels, config):
    x, w, bias = _inputs(300, 264, 384, seed=4)
    x_codes, x_scale = w8a8_reference.quantize_tiles(x)
    w_codes, w_scale = w8a8_reference.quantize_tiles(w)
    config = kernels.RowwiseGemmConfig(**config)
    out = kernels.tile_scaled_matmul(x_codes, x_scale, w_codes, w_scale, bias, torch.bfloat16, config)
    expected = w8a8_reference.w8a8_matmul(x_codes, x_scale, w_codes, w_scale, torch.bfloat16) + bias
    _assert_within_one_ulp(out, expected)


def test_quantiser_then_matmul_is_the_reference_linear(kernels, int8_gemm):
    x, w, bias = _inputs(140, 96, 256, seed=2)
    w_codes, w_scale = w8a8_reference.quantize_tiles(w)
    out = kernels.tile_scaled_matmul(*int8_gemm.quantize_tiles_triton(x), w_codes, w_scale, bias, x.dtype)
    _assert_within_one_ulp(out, w8a8_reference.w8a8_linear(x, w_codes, w_scale, bias))


def test_refusals(kernels):
    x, w, _ = _inputs(20, 24, 256, seed=1)
    x_codes, x_scale = w8a8_reference.quantize_tiles(x)
    w_codes, w_scale = w8a8_reference.quantize_tiles(w)
    with pytest.raises(ValueError, match="block_k 128"):
        config = kernels.RowwiseGemmConfig(block_k=64)
        kernels.tile_scaled_matmul(x_codes, x_scale, w_codes, w_scale, None, torch.bfloat16, config)
    with pytest.raises(ValueError, match=r"w_scale must be contiguous float32 \(1, 2\)"):
        kernels.tile_scaled_matmul(x_codes, x_scale, w_codes, w_scale[:, :1], None, torch.bfloat16)
    with pytest.raises(ValueError, match="both be int8"):
        kernels.tile_scaled_matmul(x_codes, x_scale, w_codes.float(), w_scale, None, torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        kernels.tile_scaled_matmul(x_codes, x_scale, w_codes, w_scale, None, torch.int32)


def _extreme_codes(rows: int, depth: int, seed: int) -> torch.Tensor:
    """int8 codes whose 128-wide dot products reach the int32 extremes ±2^21 (−128 · −128 · 128)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (rows, depth), generator=g, dtype=torch.int16)
    codes[:3] = -128
    codes[3] = 127
    return codes.to(torch.int8)


@pytest.mark.parametrize("kernel", ["persistent", "tiled"])
def test_bit_convert_equals_the_conversion_instruction(kernels, int8_gemm, kernel):
    """`int32_to_float_exact` gives the same float32 as I2F for every K block, so both launches agree bit
    for bit, also where the block sums reach ±2^21."""
    rows, columns, depth = 140, 136, 384
    a = _extreme_codes(rows, depth, seed=1)
    w = _extreme_codes(columns, depth, seed=2)
    g = torch.Generator().manual_seed(3)
    a_scale = torch.rand(w8a8_reference.tile_grid(rows, depth), generator=g) + 0.5
    w_scale = torch.rand(w8a8_reference.tile_grid(columns, depth), generator=g) + 0.5
    outputs = []
    for bit_convert in (False, True):
        if kernel == "persistent":
            config = kernels.RowwiseGemmConfig(block_n=128, bit_convert=bit_convert)
            outputs.append(kernels.tile_scaled_matmul(a, a_scale, w, w_scale, None, torch.float32, config))
        else:
            config = int8_gemm.GemmConfig(bit_convert=bit_convert)
            outputs.append(int8_gemm.w8a8_matmul_triton(a, a_scale, w, w_scale, None, torch.float32, config))
    assert torch.equal(outputs[0], outputs[1])
    assert outputs[1].abs().max() > 2**21  # the extremes were reached
    expected = w8a8_reference.w8a8_matmul(a, a_scale, w, w_scale, torch.float32)
    torch.testing.assert_close(outputs[1], expected, rtol=1e-6, atol=1e-3)
