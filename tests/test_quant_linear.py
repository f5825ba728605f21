"""Quantised linear layers against float64 evaluations of the spec formulas (TURBODIFFUSION.md §11, KERNELS.md
§1.7 / §1.9): the int8 tile quantiser, the exact W8A8 PyTorch path, Int8Linear / Fp8Linear modes, the fp8
recipe, and the per-device kernel plans."""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.turbo_kernels.fp8_linear import (
    fp8_linear,
    fp8_matmul_scaled_mm,
    quantize_rows_e4m3,
)
from comfyui_turbodiffusion.turbo_kernels.w8a8_reference import quantize_tiles, w8a8_linear
from comfyui_turbodiffusion.wan_models.linear_kernels import plan_fp8, plan_int8
from comfyui_turbodiffusion.wan_models.linear_layers import (
    Fp8Linear,
    Int8Linear,
    fp8_linear_factory,
    set_linear_activations,
)
from quant_formulas import (
    dequantize_tiles_f64,
    fp8_linear_f64,
    fp8_rows_quantize_f64,
    int8_linear_f64,
    int8_tile_quantize_f64,
    relative_l2,
    w8a8_f64,
)

# (M, K, N): ragged in every dimension, plus an aligned Wan-like one.
SHAPES = [(300, 200, 260), (130, 384, 129), (256, 256, 384)]
BF16_ULP = 2.0**-8  # relative spacing of bf16 values


def _activations(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    # Tiles with very different ranges, an outlier channel and an all-zero tile exercise the per-tile scales.
    x[:, :7] *= 6.0
    if shape[0] > 128 and shape[1] > 128:
        x[128:256, 128:] = 0
    return x.to(dtype)


def _weight(rows, columns, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator) / columns**0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(300, 200), (128, 384), (5, 129)])
def test_tile_quantiser_equals_the_spec_formula(shape, dtype):
    x = _activations(shape, dtype, seed=shape[0])

    codes, scale = quantize_tiles(x)
    expected_codes, expected_scale = int8_tile_quantize_f64(x)

    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == expected_scale.shape
    # For bf16/fp16 inputs the float32 and float64 quotients can never sit on different sides of a tie.
    assert torch.equal(codes.double(), expected_codes)
    assert torch.equal(scale.double(), expected_scale.float().double())


def test_tile_quantiser_saturation_rounding_and_floor():
    x = torch.zeros(2, 130)
    x[0, :6] = torch.tensor([128.0, -128.0, 0.5, 1.5, -2.5, 127.4])  # amax 128 -> multiplier 1
    codes, scale = quantize_tiles(x)
    assert codes[0, :6].tolist() == [127, -128, 0, 2, -2, 127]
    assert scale[0, 0].item() == 1.0
    assert codes[:, 128:].abs().sum() == 0
    assert scale[0, 1].item() == torch.tensor(1e-8, dtype=torch.float32).item() / 128


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_w8a8_path_matches_the_float64_formula(shape, dtype):
    rows, depth, columns = shape
    x = _activations((rows, depth), dtype, seed=1)
    codes, scale = quantize_tiles(_weight(columns, depth, seed=2))
    bias = (0.1 * torch.randn(columns, generator=torch.Generator().manual_seed(3))).to(dtype)

    out = w8a8_linear(x, codes, scale, bias)
    x_codes, x_scale = int8_tile_quantize_f64(x)
    product = w8a8_f64(x_codes, x_scale, codes, scale)
    expected = int8_linear_f64(x, codes, scale, bias)

    assert out.dtype == dtype and out.shape == (rows, columns)
    # Only the float32 accumulation and the two roundings to the output dtype differ from float64: at most
    # one output-dtype step apart, and almost always equal.
    step = product.abs().clamp_min(1e-3) * BF16_ULP + bias.double().abs().max() * BF16_ULP
    assert ((out.double() - expected.double()).abs() <= step).all()
    assert (out == expected).double().mean() > 0.97
    assert relative_l2(out, product + bias.double()) <= 5e-3  # KERNELS.md §1.9, bf16 kernels


def test_w8a8_stays_close_to_the_unquantised_product():
    """Activation quantisation per 128x128 tile costs about 2.5 % (rel-L2) on Gaussian data whose outlier
    channels stretch every tile's range."""
    x = _activations((256, 512), torch.bfloat16, seed=4)
    weight = _weight(384, 512, seed=5)
    codes, scale = quantize_tiles(weight)
    exact = x.double() @ weight.double().T
    assert relative_l2(w8a8_linear(x, codes, scale, None), exact) < 0.04


def _int8_layer(in_features, out_features, dtype, seed=6):
    layer = Int8Linear(in_features, out_features, bias=True, bias_dtype=dtype)
    codes, scale = quantize_tiles(_weight(out_features, in_features, seed))
    with torch.no_grad():
        layer.int8_weight.copy_(codes)
        layer.scale.copy_(scale)
        layer.bias.copy_(0.1 * torch.randn(out_features, generator=torch.Generator().manual_seed(seed)))
    return layer


def test_int8_linear_runs_w8a8_for_bf16_and_weight_only_for_float32():
    layer = _int8_layer(200, 260, torch.bfloat16)
    x = _activations((2, 150, 200), torch.bfloat16, seed=7)

    out = layer(x)
    expected = int8_linear_f64(x.reshape(-1, 200), layer.int8_weight, layer.scale, layer.bias)
    assert out.shape == (2, 150, 260) and out.dtype == torch.bfloat16
    assert (out.reshape(-1, 260) == expected).double().mean() > 0.97
    assert relative_l2(out.reshape(-1, 260), expected) < 5e-3

    x32 = x.float()
    dense = dequantize_tiles_f64(layer.int8_weight, layer.scale)
    layer.bias.data = layer.bias.float()
    expected32 = x32.double() @ dense.T + layer.bias.double()
    assert torch.allclose(layer(x32).double(), expected32, atol=1e-4)

    set_linear_activations(layer, "w8a8")
    forced = layer(x32).reshape(-1, 260)
    expected_forced = int8_linear_f64(x32.reshape(-1, 200), layer.int8_weight, layer.scale, layer.bias)
    assert relative_l2(forced, expected_forced) < 1e-6
    set_linear_activations(layer, "weight_only")
    assert relative_l2(layer(x), x.double() @ dense.T + layer.bias.double()) < 5e-3
    with pytest.raises(ValueError, match="activations must be one of"):
        set_linear_activations(layer, "int4")


@pytest.mark.parametrize("shape", [(300, 200), (64, 512)])
def test_fp8_row_quantiser_equals_the_formula(shape):
    x = _activations(shape, torch.bfloat16, seed=8)
    codes, scale = quantize_rows_e4m3(x)
    expected_codes, expected_scale = fp8_rows_quantize_f64(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (shape[0],)
    assert torch.equal(codes.double(), expected_codes)
    assert torch.equal(scale.double(), expected_scale)


def test_fp8_linear_reference_path_matches_the_float64_formula():
    x = _activations((300, 256), torch.bfloat16, seed=9)
    weight = _weight(384, 256, seed=10)
    codes, scale = quantize_rows_e4m3(weight)
    bias = (0.1 * torch.randn(384, generator=torch.Generator().manual_seed(11))).to(torch.bfloat16)

    out = fp8_linear(x, codes, scale, bias, use_scaled_mm=False)
    expected = fp8_linear_f64(x, codes, scale, bias)

    assert out.dtype == torch.bfloat16
    assert relative_l2(out, expected) < 5e-3
    # The recipe's accuracy against the unquantised product (per-token / per-channel e4m3).
    assert relative_l2(out, x.double() @ weight.double().T + bias.double()) < 0.05


def test_fp8_scaled_mm_call_convention():
    """torch._scaled_mm exists on the CPU in recent PyTorch: check our operand layout and scale shapes."""
    x_codes, x_scale = quantize_rows_e4m3(_activations((48, 256), torch.bfloat16, seed=12))
    w_codes, w_scale = quantize_rows_e4m3(_weight(128, 256, seed=13))
    try:
        out = fp8_matmul_scaled_mm(x_codes, x_scale, w_codes, w_scale, torch.bfloat16)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm with row-wise scales is not available on this CPU build: {error}")
    expected = (x_codes.double() @ w_codes.double().T) * x_scale.double()[:, None] * w_scale.double()[None, :]
    assert relative_l2(out, expected) < 5e-3


def test_fp8_linear_module_modes():
    factory = fp8_linear_factory(bias_dtype=torch.bfloat16)
    layer = factory(256, 384)
    weight = _weight(384, 256, seed=14)
    codes, scale = quantize_rows_e4m3(weight)
    with torch.no_grad():
        layer.weight.copy_(codes)
        layer.weight_scale.copy_(scale)
        layer.bias.zero_()
    assert isinstance(layer, Fp8Linear) and set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    x = _activations((3, 40, 256), torch.bfloat16, seed=15)

    w8a8 = layer(x).reshape(-1, 384)
    assert relative_l2(w8a8, fp8_linear_f64(x.reshape(-1, 256), codes, scale, None)) < 5e-3

    layer.bias.data = layer.bias.float()
    dequantised = codes.double() * scale.double()[:, None]
    weight_only = layer(x.float()).reshape(-1, 384)
    assert torch.allclose(weight_only.double(), x.reshape(-1, 256).double() @ dequantised.T, atol=1e-4)


@pytest.mark.parametrize(
    ("device", "triton", "capability", "path"),
    [
        ("cpu", (3, 9), None, "reference"),
        ("cuda", (3, 9), (9, 0), "triton"),
        ("cuda", (3, 4), (8, 6), "triton"),
        ("cuda", (3, 9), (7, 5), "reference"),
        ("cuda", None, (9, 0), "reference"),
        ("cuda", (3, 1), (9, 0), "reference"),
    ],
)
def test_int8_plan(device, triton, capability, path):
    plan = plan_int8(torch.device(device), triton, capability)
    assert plan.path == path and plan.reason


@pytest.mark.parametrize(
    ("device", "capability", "path"),
    [
        ("cpu", None, "reference"),
        ("cuda", (8, 6), "reference"),
        ("cuda", (8, 9), "scaled_mm"),
        ("cuda", (9, 0), "scaled_mm"),
    ],
)
def test_fp8_plan(device, capability, path):
    assert plan_fp8(torch.device(device), capability).path == path
