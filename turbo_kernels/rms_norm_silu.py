"""Fused channel RMS norm + SiLU for channels-last activations (the Wan VAE's `RMS_norm -> SiLU`, issue 7).

Per pixel (one row of C channels):  y = x / max(||x||_2, eps) * scale * gamma,  out = y * sigmoid(y),
computed in float32 and stored in `out`'s dtype: one read of x and one write of out instead of the five
passes of the unfused PyTorch ops (norm, divide, two multiplies, SiLU).

Layout: `x` and `out` are `[B, C, *spatial]` tensors whose channels are the innermost dimension in memory
(`torch.channels_last_3d` video, `torch.channels_last` frames), so each batch member is a `[pixels, C]`
row-major matrix. `out` may be a view of consecutive frames inside a larger channels-last buffer (the causal
convolutions' input buffers), which is how the VAE writes the norm's output straight behind the cached frames.
`x` in another layout is made channels-last first (one copy).

Dtypes: float32, float16, bfloat16. GPUs: any that Triton supports. `rms_norm_silu` falls back to the
PyTorch formula (`rms_norm_silu_reference`) on the CPU. The kernel differs from the unfused bf16 ops only by
their intermediate roundings (it rounds once). Tested by tests/test_vae_fast_kernel.py (TRITON_INTERPRET=1,
CPU, against the formula in float64) and on the GPU by bench/vae.py (whole-decoder comparison).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

EPS = 1e-12  # F.normalize's default, as in the Wan RMS_norm
_ELEMENTS_PER_PROGRAM = 4096  # rows per program = this / padded channels: 16 KiB of fp32 in flight


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr, gamma_ptr, out_ptr, rows, channels, scale, eps, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    channel = tl.arange(0, BLOCK_C)
    mask = (row[:, None] < rows) & (channel[None, :] < channels)
    offsets = row[:, None].to(tl.int64) * channels + channel[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    factor = scale / tl.maximum(norm, eps)
    gamma = tl.load(gamma_ptr + channel, mask=channel < channels, other=0.0).to(tl.float32)
    y = x * factor[:, None] * gamma[None, :]
    out = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """The unfused formula, as the Wan RMS_norm and SiLU modules compute it (in x's dtype)."""
    return F.silu(F.normalize(x, dim=1, eps=EPS) * scale * gamma)


def rms_norm_silu(
    x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """SiLU(RMS-norm over dim 1 of `x`) into `out` (allocated channels-last when None); returns `out`.

    `gamma` has C elements (any shape, e.g. the module's `(C, 1, 1, 1)`). On CUDA both tensors must be
    channels-innermost (see the module docstring); elsewhere the PyTorch formula is used.
    """
    if out is None:
        out = torch.empty_like(x, memory_format=_channels_last_format(x))
    if out.shape != x.shape:
        raise ValueError(f"rms_norm_silu: out {tuple(out.shape)} must have x's shape {tuple(x.shape)}")
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        out.copy_(rms_norm_silu_reference(x, gamma, scale))
        return out
    rows_x = _rows(x)
    if rows_x is None:
        x = x.contiguous(memory_format=_channels_last_format(x))
    channels = x.shape[1]
    gamma = gamma.reshape(channels).contiguous()
    block_c = triton.next_power_of_2(channels)
    block_rows = max(1, _ELEMENTS_PER_PROGRAM // block_c)
    members = [(x, out)] if _rows(out) is not None else list(zip(x.split(1), out.split(1)))
    for source, target in members:
        source_rows, target_rows = _rows(source), _rows(target)
        if source_rows is None or target_rows is None:
            raise ValueError("rms_norm_silu: out must store the channels innermost (channels-last)")
        count = source_rows.shape[0]
        _rms_norm_silu_kernel[(triton.cdiv(count, block_rows),)](
            source_rows, gamma, target_rows, count, channels, float(scale), EPS,
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return out


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """`[B, C, *spatial]` as a row-major `[pixels, C]` view, or None if its memory is not laid out so."""
    rows = t.movedim(1, -1)
    return rows.view(-1, t.shape[1]) if rows.is_contiguous() else None


def _channels_last_format(t: torch.Tensor) -> torch.memory_format:
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim(), torch.contiguous_format)
