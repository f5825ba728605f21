"""Runs the channels-last Triton kernels (turbo_kernels/channels_last_ops.py) on Triton's CPU interpreter and
prints, as JSON, their largest errors against float64 formulas written here, in units of the result's
rounding: max |out - expected| / (|expected| * eps / 2 + 1e-6). Must start with TRITON_INTERPRET=1
set (tests/test_vae_fast_kernels.py runs it in a subprocess): Triton reads it when the kernels are defined.
"""

from __future__ import annotations

import json
import os

import torch
from comfyui_turbodiffusion.turbo_kernels.channels_last_ops import (
    add_bias_residual_,
    rms_norm_silu,
    upsample_nearest2x,
)

CL3D = torch.channels_last_3d


def norm_silu_formula(x: torch.Tensor, gamma: torch.Tensor, scale: float, bias: torch.Tensor | None):
    x = x.double() if bias is None else x.double() + bias.double().view(-1, 1, 1, 1)
    y = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale * gamma.double().view(-1, 1, 1, 1)
    return y * torch.sigmoid(y)


def rounding_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error in units of one rounding to out's dtype (<= 1 for a correctly rounded result)."""
    unit = expected.abs() * torch.finfo(out.dtype).eps / 2 + 1e-6
    return ((out.double() - expected).abs() / unit).max().item()


def checks(dtype: torch.dtype) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    errors = {}
    for channels, batch, with_bias in ((20, 1, True), (96, 2, False), (96, 2, True)):
        x = randn(batch, channels, 3, 5, 7).contiguous(memory_format=CL3D)
        gamma = (1 + 0.2 * randn(channels)).view(channels, 1, 1, 1)
        bias = randn(channels) if with_bias else None
        # Written behind 2 poisoned "cached" frames of a larger buffer, as the causal convolutions do.
        buffer = torch.full((batch, channels, 5, 5, 7), float("nan"), dtype=dtype).contiguous(
            memory_format=CL3D
        )
        rms_norm_silu(x, gamma, channels**0.5, out=buffer[:, :, 2:], bias=bias)
        key = f"norm_silu C={channels} B={batch} bias={with_bias}"
        expected = norm_silu_formula(x, gamma, channels**0.5, bias)
        errors[key] = rounding_error(buffer[:, :, 2:], expected)
        errors[key + " cached frames untouched"] = float(not buffer[:, :, :2].isnan().all())
    contiguous = randn(1, 24, 2, 3, 4)  # not channels-last: converted first
    gamma = 1 + 0.2 * randn(24, 1, 1, 1)
    expected = norm_silu_formula(contiguous, gamma, 1.7, None)
    errors["norm_silu NCDHW input"] = rounding_error(rms_norm_silu(contiguous, gamma, 1.7), expected)

    h = randn(2, 20, 3, 5, 7).contiguous(memory_format=CL3D)
    residual, bias = randn(2, 20, 3, 5, 7), randn(20)
    expected = h.double() + bias.double().view(-1, 1, 1, 1) + residual.double()
    errors["bias + residual"] = rounding_error(add_bias_residual_(h, bias, residual), expected)

    frames = randn(3, 20, 5, 7).contiguous(memory_format=torch.channels_last)
    expected = frames.double().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    up = upsample_nearest2x(frames)
    errors["upsample 2x"] = rounding_error(up, expected)
    errors["upsample 2x channels-last"] = float(not up.is_contiguous(memory_format=torch.channels_last))
    return errors


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running this (see the module docstring)")
    print(json.dumps({str(dtype): checks(dtype) for dtype in (torch.float32, torch.bfloat16)}))


if __name__ == "__main__":
    main()
