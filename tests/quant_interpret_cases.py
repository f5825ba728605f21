"""Cases for the Triton W8A8 kernels (`turbo_kernels/int8_gemm.py`) on the CPU interpreter, which computes
int8 dots exactly (KERNELS.md §4.8): indexing, masking of ragged M/N/K, grouped tile order, the quantiser's
rounding and the epilogue, against the float64 spec formula and the exact PyTorch path.

Collected only by tests/test_quant_triton_interpret.py, which runs this file in a child pytest with
TRITON_INTERPRET=1 set before Triton is imported (Triton decides at import whether its own library functions
are interpretable; a process that imported it first cannot interpret kernels)."""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.turbo_kernels.w8a8_reference import quantize_tiles, w8a8_linear
from quant_formulas import int8_linear_f64, int8_tile_quantize_f64, relative_l2
from triton_children import interpreted_kernels


@pytest.fixture(scope="module")
def kernels():
    return interpreted_kernels("int8_gemm", "test_quant_triton_interpret.py")


def _problem(rows, depth, columns, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, depth, generator=generator) * torch.linspace(0.1, 4, depth)
    weight = torch.randn(columns, depth, generator=generator) / depth**0.5
    bias = 0.1 * torch.randn(columns, generator=generator)
    codes, scale = quantize_tiles(weight)
    return x.to(dtype), codes, scale, bias.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 200), (129, 256), (1, 130)])
def test_quantiser_kernel_equals_the_spec_formula(kernels, shape, dtype):
    x = _problem(*shape, 1, dtype)[0]
    x[0, 0] = x.abs().max()  # a value at +amax saturates to 127
    codes, scale = kernels.quantize_tiles_triton(x)
    expected_codes, expected_scale = int8_tile_quantize_f64(x)
    assert codes[0, 0] == 127
    assert torch.equal(codes.double(), expected_codes)
    assert torch.equal(scale, expected_scale.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [(300, 384, 260), (130, 200, 129), (5, 128, 128)],
    ids=["ragged-MN", "ragged-MNK", "small-M"],
)
def test_w8a8_kernel_equals_the_exact_path_and_the_formula(kernels, shape, dtype):
    x, codes, scale, bias = _problem(*shape, dtype, seed=shape[0])

    out = kernels.w8a8_linear_triton(x, codes, scale, bias)
    reference = w8a8_linear(x, codes, scale, bias)
    formula = int8_linear_f64(x, codes, scale, bias)

    assert out.dtype == dtype
    # The interpreter multiplies and adds separately, as the PyTorch path does: identical results.
    assert torch.equal(out, reference)
    assert (out == formula).double().mean() > 0.97
    assert relative_l2(out, formula) < 5e-3


def test_w8a8_kernel_tile_configs_and_no_bias(kernels):
    x, codes, scale, _ = _problem(200, 256, 300, torch.bfloat16, seed=3)
    x_codes, x_scale = kernels.quantize_tiles_triton(x)
    expected = w8a8_linear(x, codes, scale, None)
    for config in (kernels.GemmConfig(block_m=64, block_n=64, group_m=2), kernels.GemmConfig(block_m=32)):
        out = kernels.w8a8_matmul_triton(x_codes, x_scale, codes, scale, None, torch.bfloat16, config)
        assert torch.equal(out, expected), config


def test_w8a8_kernel_float32_output_is_the_exact_accumulation(kernels):
    x, codes, scale, _ = _problem(140, 384, 136, torch.float32, seed=4)
    x_codes, x_scale = quantize_tiles(x)
    out = kernels.w8a8_matmul_triton(x_codes, x_scale, codes, scale, None, torch.float32)
    exact_blocks = [
        (x_codes[:, k : k + 128].long() @ codes[:, k : k + 128].long().T).double() for k in (0, 128, 256)
    ]
    expected = sum(
        block
        * x_scale[:, i].double().repeat_interleave(128)[:140, None]
        * scale[:, i].double().repeat_interleave(128)[None, :136]
        for i, block in enumerate(exact_blocks)
    )
    assert relative_l2(out, expected) < 1e-6


def test_empty_batch(kernels):
    x, codes, scale, bias = _problem(0, 128, 128, torch.bfloat16)
    assert kernels.w8a8_linear_triton(x, codes, scale, bias).shape == (0, 128)
