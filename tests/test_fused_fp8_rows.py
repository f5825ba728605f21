"""fp8 W8A8 activations quantised once per input: the norms feeding q/k/v, cross-attention's q and the FFN
up-projection hand those linears one set of per-token e4m3 codes and scales (`Fp8Activations`). Judged on the
CPU against the per-linear formula (tests/fused_fp8_rows_reference.py): the same output bit for bit, with
fewer quantisations."""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.turbo_kernels import fp8_linear
from comfyui_turbodiffusion.wan_models import linear_kernels
from comfyui_turbodiffusion.wan_models.block_ops import TORCH_BLOCK_OPS
from comfyui_turbodiffusion.wan_models.linear_layers import (
    Fp8Activations,
    Int8Linear,
    set_linear_activations,
    takes_fp8_activations,
)
from fused_fp8_rows_reference import inputs, per_linear_reference, tiny_fp8_dit


def _counting(monkeypatch) -> list[int]:
    """Counts the activation quantisations of the fp8 linears (PyTorch's quantiser, which the CPU runs)."""
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return fp8_linear.quantize_rows_e4m3(x)

    monkeypatch.setattr(linear_kernels, "quantize_rows_e4m3", counted)
    return calls


def test_fp8_dit_equals_the_per_linear_formula_bit_for_bit_with_fewer_quantisations(monkeypatch):
    model = tiny_fp8_dit()
    reference = per_linear_reference(model)
    x, t, context = inputs()
    assert model.blocks[0].fp8_inputs(torch.bfloat16) == (True, True, True)
    calls = _counting(monkeypatch)
    with torch.no_grad():
        expected = reference(x, t, context)
        assert calls == []  # the reference quantises with the formula itself
        got = model(x, t, context)
    assert torch.equal(got, expected)
    # Per block: q/k/v once, o, cross q, cross k, cross v, cross o, FFN up, FFN down: 8 instead of 10.
    assert len(calls) == 8 * len(model.blocks)


def test_weight_only_mode_and_mixed_layers_keep_per_linear_inputs():
    model = tiny_fp8_dit()
    block = model.blocks[0]
    assert block.fp8_inputs(torch.float32) == (False, False, False)  # "auto": float32 runs weight-only
    set_linear_activations(model, "weight_only")
    assert block.fp8_inputs(torch.bfloat16) == (False, False, False)
    set_linear_activations(model, "w8a8")
    int8 = Int8Linear(128, 128)
    assert not takes_fp8_activations((block.self_attn.q, int8), torch.bfloat16)


def test_torch_norm_ops_return_the_rows_quantised_by_the_formula():
    generator = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(2, 5, 64, generator=generator) + 0.5).to(torch.bfloat16)
    y = torch.randn(2, 5, 64, generator=generator).to(torch.bfloat16)
    shift, scale, gate = (0.3 * torch.randn(3, 2, 1, 64, generator=generator)).unbind(0)
    plain = TORCH_BLOCK_OPS.modulated_norm(x, shift, scale, 1e-6)
    rows = TORCH_BLOCK_OPS.modulated_norm(x, shift, scale, 1e-6, fp8=True)
    _assert_rows_of(rows, plain)
    updated, plain = TORCH_BLOCK_OPS.add_and_norm(x, y, gate, 1e-6, weight=1 + shift[0, 0], bias=scale[0, 0])
    updated_too, rows = TORCH_BLOCK_OPS.add_and_norm(
        x, y, gate, 1e-6, weight=1 + shift[0, 0], bias=scale[0, 0], fp8=True
    )
    assert torch.equal(updated, updated_too)
    _assert_rows_of(rows, plain)


def test_an_fp8_linear_refuses_rows_it_would_not_quantise():
    layer = tiny_fp8_dit().blocks[0].self_attn.q
    codes, scale = fp8_linear.quantize_rows_e4m3(torch.randn(3, 128).to(torch.bfloat16))
    set_linear_activations(layer, "weight_only")
    with pytest.raises(ValueError, match="takes_fp8_activations"):
        layer(Fp8Activations(codes, scale, torch.Size((3, 128)), torch.bfloat16))


def _assert_rows_of(rows, normed: torch.Tensor) -> None:
    codes, scale = fp8_linear.quantize_rows_e4m3(normed.reshape(-1, normed.shape[-1]))
    assert isinstance(rows, Fp8Activations)
    assert rows.shape == normed.shape and rows.dtype == normed.dtype
    assert torch.equal(rows.codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(rows.scale, scale)
