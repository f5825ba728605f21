"""Memory-bound Triton kernels for channels-last activations of the Wan VAE (issue 7).

Each op is one read and one write of the activations instead of several PyTorch passes:

* `rms_norm_silu(x, gamma, scale, out, bias)`: per pixel (a row of C channels), optionally adding a
  per-channel `bias` first (the preceding convolution's, which is then run without bias),
  y = x / max(||x||_2, eps) * scale * gamma, out = y * sigmoid(y). Replaces the Wan `RMS_norm -> SiLU` (five
  passes) and the convolution's bias pass.
* `add_bias_residual_(h, bias, residual)`: h += bias + residual in place (a residual block's output: its
  last convolution, run without bias, plus the shortcut).
* `upsample_nearest2x(x)`: frames `[N, C, H, W]` -> `[N, C, 2H, 2W]`, every pixel repeated 2x2 (equal to
  `nearest-exact` at scale 2); PyTorch's channels-last kernel for this ran at a fifth of the copy bandwidth
  (bench/NOTES_vae.md).

Layout: tensors are `[B, C, *spatial]` with the channels innermost in memory (`torch.channels_last_3d`
video, `torch.channels_last` frames), i.e. each batch member is a row-major `[pixels, C]` matrix. `out` of
`rms_norm_silu` may be a run of consecutive frames inside a larger channels-last buffer (the causal
convolutions' input buffers), which is how the VAE writes the norm's output right behind the cached frames;
inputs in another layout are made channels-last first (one copy). Arithmetic in float32, results rounded
once to the output dtype (float32, float16 or bfloat16); the unfused bf16 ops round after every step, so
the two differ by bf16 rounding. Any GPU that Triton supports; on the CPU every op runs its PyTorch
reference (`*_reference`), and with TRITON_INTERPRET=1 the kernels run on the CPU interpreter, which is how
tests/test_vae_fast_kernels.py checks them against float64 formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interpreter import interpreting
from .triton_compat import TRITON_AVAILABLE, tl, triton

EPS = 1e-12  # F.normalize's default, as in the Wan RMS_norm
# Elements per program (rows = this / padded channels): 16 KiB of fp32 in flight, enough to saturate
# memory bandwidth with 4 warps.
_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr, gamma_ptr, bias_ptr, out_ptr, rows, channels, scale, eps,
    HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    channel = tl.arange(0, BLOCK_C)
    mask = (row[:, None] < rows) & (channel[None, :] < channels)
    offsets = row[:, None].to(tl.int64) * channels + channel[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel, mask=channel < channels, other=0.0).to(tl.float32)
        x = tl.where(mask, x + bias[None, :], 0.0)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    factor = scale / tl.maximum(norm, eps)
    gamma = tl.load(gamma_ptr + channel, mask=channel < channels, other=0.0).to(tl.float32)
    y = x * factor[:, None] * gamma[None, :]
    out = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_bias_residual_kernel(
    h_ptr, bias_ptr, residual_ptr, rows, channels, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    channel = tl.arange(0, BLOCK_C)
    mask = (row[:, None] < rows) & (channel[None, :] < channels)
    offsets = row[:, None].to(tl.int64) * channels + channel[None, :]
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channel, mask=channel < channels, other=0.0).to(tl.float32)
    tl.store(h_ptr + offsets, (h + bias[None, :] + residual).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_nearest2x_kernel(
    x_ptr, out_ptr, pixels, width, channels, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr
):
    pixel = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # input pixel (frame, row, column)
    channel = tl.arange(0, BLOCK_C)
    mask = (pixel[:, None] < pixels) & (channel[None, :] < channels)
    x = tl.load(x_ptr + pixel[:, None].to(tl.int64) * channels + channel[None, :], mask=mask)
    line = pixel.to(tl.int64) // width  # frame * height + row
    column = pixel.to(tl.int64) % width
    # Output pixel (2 line + a, 2 column + b) of rows that are 2 * width pixels long.
    first = (2 * line * (2 * width) + 2 * column)[:, None] * channels + channel[None, :]
    tl.store(out_ptr + first, x, mask=mask)
    tl.store(out_ptr + first + channels, x, mask=mask)
    tl.store(out_ptr + first + 2 * width * channels, x, mask=mask)
    tl.store(out_ptr + first + (2 * width + 1) * channels, x, mask=mask)


def rms_norm_silu_reference(
    x: torch.Tensor, gamma: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The unfused formula, as the Wan modules compute it (in x's dtype)."""
    if bias is not None:
        x = x + bias.reshape(-1, *(1,) * (x.dim() - 2))
    return F.silu(F.normalize(x, dim=1, eps=EPS) * scale * gamma)


def add_bias_residual_reference(h: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return h.add_(bias.reshape(-1, *(1,) * (h.dim() - 2))).add_(residual)


def upsample_nearest2x_reference(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


def rms_norm_silu(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiLU(RMS-norm over dim 1 of `x` (+ `bias`)) into `out` (allocated channels-last when None).

    `gamma` and `bias` have C elements (any shape, e.g. the module's `(C, 1, 1, 1)`).
    """
    if out is None:
        out = torch.empty_like(x, memory_format=_channels_last_format(x))
    if out.shape != x.shape:
        raise ValueError(f"rms_norm_silu: out {tuple(out.shape)} must have x's shape {tuple(x.shape)}")
    if not _use_kernels(x):
        out.copy_(rms_norm_silu_reference(x, gamma, scale, bias))
        return out
    x = _channels_last(x)
    channels = x.shape[1]
    gamma = gamma.reshape(channels).contiguous()
    bias_arg = gamma if bias is None else bias.reshape(channels).contiguous()
    block_rows, block_c = _blocks(channels)
    for source, target in _batch_rows(x, out):
        count = source.shape[0]
        _rms_norm_silu_kernel[(triton.cdiv(count, block_rows),)](
            source, gamma, bias_arg, target, count, channels, float(scale), EPS,
            HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return out


def add_bias_residual_(h: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`h += bias + residual` in place (`bias` per channel); returns `h`."""
    if h.shape != residual.shape:
        raise ValueError(f"add_bias_residual_: shapes {tuple(h.shape)} and {tuple(residual.shape)} differ")
    if not _use_kernels(h):
        return add_bias_residual_reference(h, bias, residual)
    residual = _channels_last(residual)
    channels = h.shape[1]
    block_rows, block_c = _blocks(channels)
    for target, source in _batch_rows(h, residual):
        count = target.shape[0]
        _add_bias_residual_kernel[(triton.cdiv(count, block_rows),)](
            target, bias.reshape(channels).contiguous(), source, count, channels,
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return h


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """`[N, C, H, W]` -> `[N, C, 2H, 2W]` (channels-last), each pixel repeated 2x2."""
    if not _use_kernels(x):
        return upsample_nearest2x_reference(x)
    x = _channels_last(x)
    n, channels, height, width = x.shape
    out = torch.empty((n, channels, 2 * height, 2 * width), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)  # fmt: skip
    block_rows, block_c = _blocks(channels)
    pixels = n * height * width
    _upsample_nearest2x_kernel[(triton.cdiv(pixels, block_rows),)](
        x, out, pixels, width, channels, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=4
    )
    return out


def _use_kernels(x: torch.Tensor) -> bool:
    return TRITON_AVAILABLE and (x.is_cuda or interpreting())


def _blocks(channels: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(channels)
    return max(1, _ELEMENTS_PER_PROGRAM // block_c), block_c


def _batch_rows(first: torch.Tensor, second: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Both tensors as `[pixels, C]` row matrices, per batch member unless the whole batch is one matrix."""
    pairs = [(first, second)] if _rows(first) is not None and _rows(second) is not None else None
    if pairs is None:
        pairs = list(zip(first.split(1), second.split(1)))
    rows = [(_rows(a), _rows(b)) for a, b in pairs]
    if any(a is None or b is None for a, b in rows):
        raise ValueError("channels-last ops: tensors must store the channels innermost (channels-last)")
    return rows


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """`[B, C, *spatial]` as a row-major `[pixels, C]` view, or None if its memory is not laid out so."""
    rows = t.movedim(1, -1)
    return rows.view(-1, t.shape[1]) if rows.is_contiguous() else None


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if _rows(t) is not None else t.contiguous(memory_format=_channels_last_format(t))


def _channels_last_format(t: torch.Tensor) -> torch.memory_format:
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim(), torch.contiguous_format)
