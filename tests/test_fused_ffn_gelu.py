"""The FFN up-projection and its GELU through the block ops' `linear_gelu`: on the CPU exactly today's two
operations (nn.Linear, then nn.GELU(approximate="tanh")) whatever the block ops; on CUDA the dense bf16 path
may run one cuBLASLt GEMM with the GELU epilogue, which must be the tanh GELU (its once-per-device check is
shown to reject the erf GELU that `torch._addmm_activation` applies on the CPU) and agree within bf16."""

from __future__ import annotations

import math

import pytest
import torch
from comfyui_turbodiffusion.wan_models.block_ops import (
    GELU_CHECK_TOLERANCE,
    TORCH_BLOCK_OPS,
    gelu_epilogue_applies,
    gelu_epilogue_error,
    linear_gelu_epilogue,
    make_block_ops,
)
from torch import nn


def _tanh_gelu64(h: torch.Tensor) -> torch.Tensor:
    """Wan's activation written from its definition, in float64."""
    h = h.double()
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def _problem(device="cpu", dtype=torch.bfloat16, tokens=37, dim=64, hidden=96):
    generator = torch.Generator().manual_seed(5)
    layer = nn.Linear(dim, hidden)
    with torch.no_grad():
        layer.weight.normal_(0, dim**-0.5, generator=generator)
        layer.bias.normal_(0, 0.3, generator=generator)
    x = torch.randn(2, tokens, dim, generator=generator)
    return layer.to(device, dtype), x.to(device, dtype)


@pytest.mark.parametrize("kind", ("torch", "auto", "triton"))
def test_cpu_runs_the_two_operations_exactly(kind):
    layer, x = _problem()
    ops = TORCH_BLOCK_OPS if kind == "torch" else make_block_ops(kind)
    expected = nn.Sequential(layer, nn.GELU(approximate="tanh"))(x)
    assert not gelu_epilogue_applies(layer, x)
    assert torch.equal(ops.linear_gelu(layer, x), expected)
    # And that is Wan's tanh GELU of the bf16 linear output, within one bf16 rounding.
    reference = _tanh_gelu64(layer(x))
    assert torch.allclose(expected.double(), reference, rtol=2**-8, atol=1e-6)


def test_the_epilogue_check_rejects_the_erf_gelu():
    """On the CPU `torch._addmm_activation(..., use_gelu=True)` is the exact (erf) GELU: the check that
    guards the CUDA epilogue sees it as another function (tanh and erf differ by ~5e-4 on [-4, 4])."""
    error = gelu_epilogue_error(torch.device("cpu"))
    assert 1e-4 < error < 1e-3
    assert error > GELU_CHECK_TOLERANCE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_epilogue_is_the_tanh_gelu_within_bf16():
    device = torch.device("cuda")
    assert gelu_epilogue_error(device) <= GELU_CHECK_TOLERANCE
    layer, x = _problem("cuda", tokens=1000, dim=1536, hidden=8960)
    assert gelu_epilogue_applies(layer, x)
    with torch.no_grad():
        fused = linear_gelu_epilogue(layer, x)
        unfused = nn.Sequential(layer, nn.GELU(approximate="tanh"))(x)
        via_ops = make_block_ops("auto").linear_gelu(layer, x)
        reference = _tanh_gelu64(
            torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        )
    assert torch.equal(via_ops, fused)
    # Fused: one rounding of the float32 result; unfused: the linear rounded to bf16 first, which the GELU's
    # flat negative tail (h ≈ -3: relative slope ~7) can amplify to a few bf16 ulps there.
    assert (fused.double() - reference).abs().max() <= 2**-8 * reference.abs().max() + 1e-3
    difference = (fused.float() - unfused.float()).abs()
    assert (difference <= 2**-5 * unfused.float().abs() + 2**-12).all()
