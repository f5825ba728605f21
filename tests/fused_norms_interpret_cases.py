"""Cases for the fused norm / RoPE / residual kernels (`turbo_kernels/fused_norms.py`) on the CPU interpreter.

Judged by formulas written here from TURBODIFFUSION.md §2.4-2.7 (float64 norms, explicit rounding points),
by the module's PyTorch references, and on a whole tiny DiT by the step-by-step spec forward
(tests/dit_spec_reference.py). Collected only by tests/test_fused_norms_interpret.py, which runs this file in
a child pytest with TRITON_INTERPRET=1 set before Triton is imported.

Tolerance of the norms: the kernels sum a row in another order than PyTorch (and than float64), so the
float32 LayerNorm / RMSNorm may differ in its last bits and its rounding to bf16 / fp16 can land one unit in
the last place (ulp) away. Such a flip of a rounded norm n changes what follows by at most ulp(n) times the
factor applied next (1 + scale for the modulation; a rotation keeps |(e, o)|), plus one ulp of the output's
own rounding: |kernel − formula| ≤ 2^-p · (|n·factor| + |out|), p the mantissa bits (7 for bf16, 10 for fp16),
plus one subnormal step.
Flips are rare (the float32 error is ~2^-16 of a bf16 ulp), so at least 99 % of the values must be equal.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from triton_children import interpreted_kernels

EPS = 1e-6
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
WIDTHS = (96, 200, 1536)


@pytest.fixture(scope="module")
def kernels():
    return interpreted_kernels("fused_norms", "test_fused_norms_interpret.py")


def _inputs(batch, tokens, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows with an offset and uneven channel scales, as the residual stream has.
    x = (torch.randn(batch, tokens, width, generator=g) * torch.linspace(0.2, 3, width) + 0.7).to(dtype)
    y = torch.randn(batch, tokens, width, generator=g).to(dtype)
    modulation = 0.5 * torch.randn(batch, 6, width, generator=g)  # float32; chunks have batch stride 6C
    weight = 1 + 0.2 * (2 * torch.rand(width, generator=g) - 1)
    bias = 0.1 * torch.randn(width, generator=g)
    return x, y, modulation, weight, bias


def _layer_norm64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + EPS)


def _within_flip_bound(got, expected, propagated, dtype) -> None:
    """|got − expected| ≤ 2^-p (|propagated| + |expected|); most values identical (module docstring)."""
    if dtype == torch.float32:
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        return
    unit = 2.0 ** -MANTISSA_BITS[dtype]
    error = (got.double() - expected.double()).abs()
    subnormal_step = torch.finfo(dtype).smallest_normal * unit
    bound = unit * (propagated.double().abs() + expected.double().abs()) + subnormal_step
    assert (error <= bound).all(), f"max excess {(error - bound).max().item():.3g}"
    assert (got == expected).double().mean().item() >= 0.99


def _round_to(dtype, values: torch.Tensor) -> torch.Tensor:
    return values.to(dtype).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width", WIDTHS)
def test_modulated_layer_norm(kernels, width, dtype):
    """§2.5 step 2: T(fp32(T(LN(x)))·(1 + m1) + m0)."""
    x, _, modulation, _, _ = _inputs(2, 7, width, dtype)
    shift, scale = modulation[:, 0:1], modulation[:, 1:2]
    normed = _round_to(dtype, _layer_norm64(x))
    expected = (normed * (1 + scale) + shift).to(dtype)

    got = kernels.layer_norm_triton(x, EPS, shift=shift, scale=scale)

    assert got.dtype == dtype and got.shape == x.shape
    _within_flip_bound(got, expected, normed * (1 + scale), dtype)
    reference = kernels.layer_norm_reference(x, EPS, shift=shift, scale=scale)
    _within_flip_bound(got, reference, normed * (1 + scale), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", WIDTHS)
def test_gated_residual_then_affine_layer_norm(kernels, width, dtype):
    """§2.5 steps 4-5: x' = x + s·T(m2) as T operations, then norm3 = T(LN(x')·w + b) in float32."""
    x, y, modulation, weight, bias = _inputs(2, 5, width, dtype, seed=1)
    gate = modulation[:, 2:3]
    product = _round_to(dtype, y.float() * _round_to(dtype, gate))
    updated = (x.float() + product).to(dtype)
    expected = (_layer_norm64(updated) * weight.double() + bias.double()).to(dtype)

    got_x, got = kernels.layer_norm_triton(x, EPS, residual=y, gate=gate, weight=weight, bias=bias)

    assert torch.equal(got_x, updated)
    _within_flip_bound(got, expected, torch.zeros_like(got, dtype=torch.float32), dtype)


@pytest.mark.parametrize("width", WIDTHS)
def test_plain_residual_then_modulated_layer_norm(kernels, width):
    """§2.5 steps 5-6: x' = x + c (bf16 add), then the FFN input T(fp32(T(LN(x')))·(1 + m4) + m3)."""
    x, y, modulation, _, _ = _inputs(2, 5, width, torch.bfloat16, seed=2)
    shift, scale = modulation[:, 3:4], modulation[:, 4:5]
    updated = (x.float() + y.float()).to(torch.bfloat16)
    normed = _round_to(torch.bfloat16, _layer_norm64(updated))
    expected = (normed * (1 + scale) + shift).to(torch.bfloat16)

    got_x, got = kernels.layer_norm_triton(x, EPS, residual=y, shift=shift, scale=scale)

    assert torch.equal(got_x, updated)
    _within_flip_bound(got, expected, normed * (1 + scale), torch.bfloat16)


def test_layer_norm_without_affine_or_modulation_and_flat_rows(kernels):
    x, _, _, _, _ = _inputs(1, 9, 200, torch.bfloat16, seed=3)
    got = kernels.layer_norm_triton(x[0], EPS)
    _within_flip_bound(got, _layer_norm64(x[0]).to(torch.bfloat16), torch.zeros(1), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", WIDTHS)
def test_gated_add_is_bit_exact(kernels, width, dtype):
    """§2.5 step 7: x + f·T(m5), product and sum each rounded to T."""
    x, y, modulation, _, _ = _inputs(2, 6, width, dtype, seed=4)
    gate = modulation[:, 5:6]
    expected = (x.float() + _round_to(dtype, y.float() * _round_to(dtype, gate))).to(dtype)
    assert torch.equal(kernels.gated_add_triton(x, y, gate), expected)
    assert torch.equal(kernels.gated_add_reference(x, y, gate), expected)


def _rope_table(grid, head_dim):
    """Angles [L, D/2] of §2.4 ([t | h | w] columns, base 10000), float32 as TurboDiffusion computes them."""
    spatial = 2 * (head_dim // 6)
    columns = []
    for axis, (size, axis_dim) in enumerate(zip(grid, (head_dim - 2 * spatial, spatial, spatial))):
        frequencies = 10000.0 ** (-torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)
        angles = torch.arange(size, dtype=torch.float32)[:, None] * frequencies
        view = [1, 1, 1, axis_dim // 2]
        view[axis] = size
        columns.append(angles.view(view).expand(*grid, axis_dim // 2))
    return torch.cat(columns, dim=-1).reshape(math.prod(grid), head_dim // 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("width", "head_dim"), [(256, 128), (1536, 128), (96, 32)])
def test_rms_norm_over_all_heads_then_interleaved_rope(kernels, width, head_dim, dtype):
    """§2.6: RMSNorm over the full width (weight multiplied in float32, then rounded), RoPE of each head's
    channel pairs (2p, 2p+1) by angle column p as a complex rotation, computed in float64 here."""
    grid = (2, 3, 2)
    tokens = math.prod(grid)
    x, _, _, weight, _ = _inputs(2, tokens, width, dtype, seed=5)
    angles = _rope_table(grid, head_dim)
    x64 = x.double()
    normed = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()).to(dtype)
    pairs = torch.view_as_complex(normed.double().reshape(2, tokens, -1, head_dim // 2, 2).contiguous())
    rotation = torch.polar(torch.ones_like(angles.double()), angles.double())[None, :, None, :]
    expected = torch.view_as_real(pairs * rotation).reshape(x.shape).to(dtype)

    got = kernels.rms_norm_rope_triton(x, weight, EPS, angles.cos(), angles.sin())
    # A flipped rounding of e or o moves both rotated channels by at most ulp(|e| + |o|).
    pair_size = normed.double().reshape(2, tokens, -1, 2).abs().sum(-1, keepdim=True).expand(-1, -1, -1, 2)
    _within_flip_bound(got, expected, pair_size.reshape(x.shape), dtype)
    reference = kernels.rms_norm_rope_reference(x, weight, EPS, angles.cos(), angles.sin())
    _within_flip_bound(got, reference, pair_size.reshape(x.shape), dtype)

    plain = kernels.rms_norm_rope_triton(x, weight, EPS)
    _within_flip_bound(plain, normed, torch.zeros(1), dtype)


def test_invalid_inputs_are_explained(kernels):
    x, y, modulation, weight, bias = _inputs(2, 4, 96, torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.layer_norm_triton(x.transpose(1, 2), EPS)
    with pytest.raises(ValueError, match="float32"):
        kernels.gated_add_triton(x, y, modulation[:, :1].to(torch.bfloat16))
    with pytest.raises(ValueError, match="not both"):
        kernels.layer_norm_triton(
            x, EPS, weight=weight, bias=bias, shift=modulation[:, :1], scale=modulation[:, 1:2]
        )
    with pytest.raises(ValueError, match="cos/sin"):
        kernels.rms_norm_rope_triton(x, weight, EPS, torch.zeros(4, 7), torch.zeros(4, 7))


def test_tiny_dit_with_fused_ops_follows_the_spec_and_matches_pytorch_ops(tmp_path):
    """The whole forward with the fused kernels injected: within the same 2e-3 of the step-by-step spec
    forward as the PyTorch ops (tests/test_dit_numerics.py), and within bf16 tolerance of the PyTorch ops."""
    from comfyui_turbodiffusion.wan_models.block_ops import make_block_ops
    from comfyui_turbodiffusion.wan_models.dit_loader import load_dit
    from dit_reference import make_diffusers_model, make_inputs, to_original_layout, to_turbodiffusion_layout
    from dit_spec_reference import spec_forward

    original = to_turbodiffusion_layout(to_original_layout(make_diffusers_model(16, seed=2).state_dict()))
    state = {k: (v.float() if ".norm" in k else v.to(torch.bfloat16)) for k, v in original.items()}
    torch.save(state, tmp_path / "bf16.pth")
    model = load_dit(tmp_path / "bf16.pth")
    x, t, context, _ = make_inputs(16, (2, 16, 3, 4, 4))

    with torch.no_grad():
        unfused = model(x, t, context)
        model.set_block_ops(make_block_ops("triton"))
        fused = model(x, t, context)
        expected = spec_forward(state, x, t, context, num_heads=2)

    assert (fused - expected).abs().max().item() <= 2e-3
    assert (fused - unfused).abs().max().item() <= 2e-3
    assert F.cosine_similarity(fused.flatten(), unfused.flatten(), dim=0).item() > 0.9999


@pytest.mark.parametrize("width", (200, 1536))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_layer_norm_emitting_e4m3_rows_equals_the_quantiser_on_its_output(kernels, width, dtype):
    """`quantize_e4m3=True`: the same rows as quantize_rows_e4m3 of the kernel's own normalised output
    (fp8_linear's per-token formula), for the three norms feeding fp8 linears; a constant row normalises to
    zeros (amax floor), a row with a dominant channel gives subnormal e4m3 codes elsewhere."""
    from comfyui_turbodiffusion.turbo_kernels.fp8_linear import quantize_rows_e4m3

    x, y, modulation, weight, bias = _inputs(2, 5, width, dtype, seed=4)
    x[0, 0] = 1.5
    x[1, 2, 7] = 4000 if dtype != torch.float16 else 600
    shift, scale, gate = modulation[:, 0:1], modulation[:, 1:2], modulation[:, 2:3]
    for options in (
        dict(shift=shift, scale=scale),
        dict(residual=y, gate=gate, weight=weight, bias=bias),
        dict(residual=y, shift=shift, scale=scale),
    ):
        plain = kernels.layer_norm_triton(x, EPS, **options)
        rows = kernels.layer_norm_triton(x, EPS, quantize_e4m3=True, **options)
        if "residual" in options:
            assert torch.equal(rows[0], plain[0])
            plain, rows = plain[1], rows[1]
        codes, row_scale = quantize_rows_e4m3(plain.reshape(-1, width))
        # Values, not bytes: the interpreter's e4m3 rounding (sage_prepass.to_e4m3) gives +0 where a tiny
        # negative quotient underflows, the hardware and PyTorch -0; both contribute 0 to the GEMM.
        assert torch.equal(rows[0].float(), codes.float())
        assert torch.equal(rows[1], row_scale)


def test_tiny_fp8_dit_with_fused_ops_equals_its_per_linear_formula_bit_for_bit():
    """The fused kernels quantise the rows for q/k/v, cross q and FFN up themselves: the forward equals the
    same model whose fp8 linears each quantise their (kernel-normalised) input by the formula."""
    from comfyui_turbodiffusion.wan_models.block_ops import make_block_ops
    from fused_fp8_rows_reference import inputs, per_linear_reference, tiny_fp8_dit

    model = tiny_fp8_dit()
    model.set_block_ops(make_block_ops("triton"))
    reference = per_linear_reference(model)
    x, t, context = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, context), reference(x, t, context))
