"""Quantised linears on a CUDA GPU (skipped without one): the Triton W8A8 kernel and torch._scaled_mm against
the float64 formulas at Wan-like shapes, and the device plans picking the fast paths."""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.turbo_kernels.fp8_linear import fp8_linear, quantize_rows_e4m3
from comfyui_turbodiffusion.turbo_kernels.w8a8_reference import quantize_tiles, w8a8_linear
from comfyui_turbodiffusion.wan_models import linear_kernels
from quant_formulas import fp8_linear_f64, int8_linear_f64, relative_l2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _problem(rows, depth, columns, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, depth, generator=generator) * torch.linspace(0.1, 4, depth)).to(torch.bfloat16)
    weight = torch.randn(columns, depth, generator=generator) / depth**0.5
    bias = (0.1 * torch.randn(columns, generator=generator)).to(torch.bfloat16)
    return x, weight, bias


@pytest.mark.parametrize("shape", [(1000, 1536, 1536), (777, 1536, 8960), (300, 8960, 1536), (129, 200, 260)])
def test_triton_w8a8_on_gpu(shape):
    from comfyui_turbodiffusion.turbo_kernels.int8_gemm import quantize_tiles_triton, w8a8_linear_triton

    x, weight, bias = _problem(*shape)
    codes, scale = quantize_tiles(weight)
    cuda = [t.cuda() for t in (x, codes, scale, bias)]

    x_codes, x_scale = quantize_tiles_triton(cuda[0])
    reference_codes, reference_scale = quantize_tiles(cuda[0])
    assert torch.equal(x_codes, reference_codes) and torch.equal(x_scale, reference_scale)

    out = w8a8_linear_triton(*cuda).cpu()
    reference = w8a8_linear(*cuda).cpu()
    formula = int8_linear_f64(x, codes, scale, bias)
    # FMA accumulation on the GPU may move a result by one bf16 step.
    assert relative_l2(out, formula) < 5e-3
    assert (out.float() - reference.float()).abs().max() <= 2**-7 * reference.float().abs().max()
    assert linear_kernels._int8_path(torch.device("cuda", torch.cuda.current_device())) == "triton"


def test_fp8_on_gpu():
    x, weight, bias = _problem(1000, 1536, 1536)
    codes, scale = quantize_rows_e4m3(weight)
    device = torch.device("cuda", torch.cuda.current_device())
    fast = linear_kernels._fp8_path(device) in linear_kernels.FAST_FP8_PATHS
    out = fp8_linear(x.cuda(), codes.cuda(), scale.cuda(), bias.cuda(), fast).cpu()
    assert relative_l2(out, fp8_linear_f64(x, codes, scale, bias)) < 5e-3
    if torch.cuda.get_device_capability() >= (9, 0):
        assert fast


def test_fp8_bias_in_the_scaled_mm_epilogue():
    """Where this PyTorch adds the bias inside `_scaled_mm`, the result is the formula's within tolerance and
    the Triton quantiser agrees with PyTorch's bit for bit (else the fp8 linears would use the slow one)."""
    x, weight, bias = _problem(1000, 1536, 8960)
    codes, scale = quantize_rows_e4m3(weight)
    device = torch.device("cuda", torch.cuda.current_device())
    if linear_kernels._fp8_path(device) not in linear_kernels.FAST_FP8_PATHS:
        pytest.skip("no FP8 tensor cores")
    assert linear_kernels.triton_quantises_fp8_activations(device)
    fused = linear_kernels._scaled_mm_adds_bias(device)
    cuda = [t.cuda() for t in (x, codes, scale, bias)]
    out = fp8_linear(*cuda, use_scaled_mm=True, bias_in_gemm=fused).cpu()
    assert relative_l2(out, fp8_linear_f64(x, codes, scale, bias)) < 5e-3
