"""Cases for the Triton per-row e4m3 quantiser (`turbo_kernels/fp8_quant.py`) on the CPU interpreter, judged
by the formula of FORMATS/KERNELS (amax/448 per row, x times the correctly rounded 448/amax, clamp, round to
nearest even) in float64 and by the PyTorch quantiser the fp8 linears use elsewhere.

Collected only by tests/test_fp8_quant_interpret.py (child pytest with TRITON_INTERPRET=1). Codes are
compared as numbers: the interpreter's rounding emulation returns +0 where e4m3 keeps -0 (both decode to 0).
"""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.turbo_kernels.fp8_linear import quantize_rows_e4m3
from triton_children import interpreted_kernels

E4M3_MAX = 448.0


@pytest.fixture(scope="module")
def kernels():
    return interpreted_kernels("fp8_quant", "test_fp8_quant_interpret.py")


def _activations(rows, columns, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=g) * torch.logspace(-7, 3, columns)  # subnormal codes too
    x[1] = 0.0  # an all-zero row: amax takes the floor 1e-8
    x[2, 3] = 3.0e4  # one outlier: the rest of its row is small
    return x.to(dtype)


def _e4m3_f64(values: torch.Tensor) -> torch.Tensor:
    """Round float64 values to e4m3 (1 sign, 4 exponent bits bias 7, 3 mantissa bits), nearest even."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(1e-30))).clamp_min(-6)
    quantum = torch.pow(2.0, exponent - 3)
    return torch.round(values / quantum) * quantum  # torch.round: halves to even


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "columns"), [(7, 300), (3, 1536), (4, 5), (5, 8960), (3, 17000)])
def test_codes_and_scales_follow_the_formula(kernels, rows, columns, dtype):
    x = _activations(rows, columns, dtype)
    codes, scale = kernels.quantize_rows_e4m3_triton(x)

    amax = x.double().abs().amax(dim=1).clamp_min(1e-8).float()
    expected_scale = (amax.double() / E4M3_MAX).float().double()  # float32 results, correctly rounded
    inverse = (E4M3_MAX / amax.double()).float()
    product = (x.float() * inverse[:, None]).double()  # one float32 rounding of x · (448/amax)
    expected = _e4m3_f64(product.clamp(-E4M3_MAX, E4M3_MAX))
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.equal(scale.double(), expected_scale)
    assert torch.equal(codes.double(), expected)

    reference_codes, reference_scale = quantize_rows_e4m3(x)
    assert torch.equal(codes.float(), reference_codes.float()) and torch.equal(scale, reference_scale)


def test_strided_rows_and_refusals(kernels):
    x = _activations(6, 256, torch.bfloat16)
    view = x[:, :200]  # rows 256 apart, 200 used
    codes, scale = kernels.quantize_rows_e4m3_triton(view)
    reference_codes, reference_scale = quantize_rows_e4m3(view.contiguous())
    assert torch.equal(codes.float(), reference_codes.float()) and torch.equal(scale, reference_scale)
    with pytest.raises(ValueError, match="row-major"):
        kernels.quantize_rows_e4m3_triton(x.t())


def test_linear_kernels_adopt_the_triton_quantiser_after_its_check():
    from comfyui_turbodiffusion.turbo_kernels.fp8_quant import quantize_rows_e4m3_triton
    from comfyui_turbodiffusion.wan_models import linear_kernels

    assert linear_kernels._fp8_quantizer(torch.device("cpu")) is quantize_rows_e4m3_triton
