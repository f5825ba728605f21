"""fp8 linears on the Triton row-wise GEMM (issues 6 and 8): the device plan prefers it where Triton runs it,
falls back in order when its self-check fails, and the FFN's GELU seam hands `gelu=True` to a quantised layer
whose GEMM applies it (CPU: the reference computes the same float32 value, one rounding). The GPU test checks
the Triton path against the float64 formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_turbodiffusion.turbo_kernels.fp8_linear import E4M3, quantize_rows_e4m3
from comfyui_turbodiffusion.wan_models import linear_kernels
from comfyui_turbodiffusion.wan_models.block_ops import as_fp8_activations, make_block_ops
from comfyui_turbodiffusion.wan_models.linear_kernels import plan_fp8
from comfyui_turbodiffusion.wan_models.linear_layers import Fp8Linear
from quant_formulas import fp8_rows_quantize_f64, relative_l2
from rowwise_formulas import rowwise_gemm_f64

SM90 = torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("capability", "triton", "path"),
    [
        ((9, 0), (3, 9), "triton"),
        ((8, 9), (3, 4), "triton"),
        ((9, 0), (3, 3), "scaled_mm"),
        ((12, 0), (3, 4), "scaled_mm"),  # consumer Blackwell: Triton < 3.6 has no e4m3 tensor cores there
        ((12, 0), (3, 6), "triton"),
        ((9, 0), None, "scaled_mm"),
        ((8, 6), (3, 9), "reference"),
    ],
)
def test_fp8_plan_prefers_the_triton_gemm(capability, triton, path):
    plan = plan_fp8(torch.device("cuda"), capability, triton)
    assert plan.path == path and plan.reason


@pytest.fixture
def fake_sm90(monkeypatch):
    """linear_kernels sees an sm90 GPU with Triton 3.9 whose fast paths pass their self-checks."""
    linear_kernels._fp8_path.cache_clear()
    monkeypatch.setattr(linear_kernels, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(linear_kernels, "_triton_version", lambda: (3, 9))
    monkeypatch.setattr(linear_kernels, "_compare_rowwise_fp8", lambda device: 0.0)
    monkeypatch.setattr(linear_kernels, "_compare_fp8", lambda device: 0.0)
    yield monkeypatch
    linear_kernels._fp8_path.cache_clear()


def test_sm90_runs_fp8_linears_on_the_triton_gemm(fake_sm90):
    assert linear_kernels._fp8_path(SM90) == "triton"
    assert linear_kernels.fp8_gemm_fuses_gelu(SM90, torch.bfloat16)
    assert not linear_kernels.fp8_gemm_fuses_gelu(SM90, torch.float16)  # the GEMM writes bf16 only


def test_a_failing_triton_check_falls_back_to_scaled_mm(fake_sm90):
    def broken(device):
        raise RuntimeError("no such instruction")

    fake_sm90.setattr(linear_kernels, "_compare_rowwise_fp8", broken)
    assert linear_kernels._fp8_path(SM90) == "scaled_mm"


def test_a_disagreeing_triton_gemm_and_scaled_mm_fall_back_to_the_reference(fake_sm90):
    fake_sm90.setattr(linear_kernels, "_compare_rowwise_fp8", lambda device: 1.0)
    fake_sm90.setattr(linear_kernels, "_compare_fp8", lambda device: 1.0)
    assert linear_kernels._fp8_path(SM90) == "reference"


def _fp8_layer(depth=96, columns=80, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layer = Fp8Linear(depth, columns, bias_dtype=torch.bfloat16)
    codes, scale = quantize_rows_e4m3(torch.randn(columns, depth, generator=generator) / depth**0.5)
    layer.weight.copy_(codes)
    layer.weight_scale.copy_(scale)
    layer.bias.copy_(torch.randn(columns, generator=generator))
    x = (2 * torch.randn(2, 33, depth, generator=generator)).to(torch.bfloat16)
    return layer, x


def _one_rounding_formula(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """GELU_tanh of (x_q · W_qᵀ) · (s_x[m] · s_w[n]) + b evaluated in float32 (products of e4m3 codes are
    exact there), rounded to bf16 once; x_q, s_x from the spec's per-token e4m3 quantiser."""
    codes, scale = fp8_rows_quantize_f64(x.reshape(-1, x.shape[-1]))
    product = codes.float() @ layer.weight.float().T
    value = product * (scale.float()[:, None] * layer.weight_scale[None, :]) + layer.bias.float()
    out = F.gelu(value, approximate="tanh").to(torch.bfloat16)
    return out.reshape(*x.shape[:-1], layer.out_features)


def test_the_cpu_keeps_the_separate_gelu():
    layer, x = _fp8_layer()
    assert not layer.fuses_gelu(x)
    out = make_block_ops("auto").linear_gelu(layer, x)
    assert torch.equal(out, F.gelu(layer(x), approximate="tanh"))


@pytest.mark.parametrize("prequantised", [False, True])
def test_the_gelu_seam_routes_gelu_into_the_fp8_gemm(monkeypatch, prequantised):
    monkeypatch.setattr(linear_kernels, "fp8_gemm_fuses_gelu", lambda device, dtype: True)
    layer, x = _fp8_layer()
    given = as_fp8_activations(x) if prequantised else x
    assert layer.fuses_gelu(given)
    out = make_block_ops("auto").linear_gelu(layer, given)
    expected = _one_rounding_formula(layer, x)
    assert torch.equal(out, expected)
    # Rounding layer(x) to bf16 before the GELU gives other numbers: the seam did not run the two steps.
    assert not torch.equal(out, F.gelu(layer(x), approximate="tanh"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gelu", [False, True])
def test_triton_fp8_linear_on_gpu_matches_the_float64_formula(gelu):
    device = torch.device("cuda", torch.cuda.current_device())
    if linear_kernels._fp8_path(device) != "triton":
        pytest.skip("the Triton row-wise GEMM does not run fp8 on this GPU")
    layer, x = _fp8_layer(depth=1536, columns=8960 if gelu else 1536)
    layer, x = layer.to(device), x.reshape(-1, 1536)[:60].repeat(17, 1).to(device)
    x = x + 0.01 * torch.randn_like(x)
    out = make_block_ops("auto").linear_gelu(layer, x) if gelu else layer(x)
    codes, scale = fp8_rows_quantize_f64(x.cpu())
    exact, _ = rowwise_gemm_f64(
        codes.to(E4M3), scale.float(), layer.weight.cpu(), layer.weight_scale.cpu(), layer.bias.cpu(), gelu
    )
    # Hopper's fp8 wgmma accumulates with fewer than float32's bits between promotions (cuBLAS' fast
    # accumulation does the same): a relative-L2 bound like the other fp8 GPU tests, not one bf16 ulp.
    assert relative_l2(out.cpu(), exact) < 5e-3
