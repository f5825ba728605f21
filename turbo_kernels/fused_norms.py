"""Fused Triton kernels for the element-wise work of a Wan DiT block (KERNELS.md §1.8, §4.7; issue 8).

What they compute, with TurboDiffusion's rounding points (TURBODIFFUSION.md §2.5-2.7, §2.11); x is the
residual stream [B, L, C] in its dtype `T` (bf16 in production), per-sample vectors (shift, scale, gate) are
float32 [B, 1, C] (any batch stride), norm weights float32 or `T`:

* `layer_norm_triton(x, eps, residual=, gate=, weight=, bias=, shift=, scale=)`, one row per program:
  - optional residual first: x' = T(x + T(residual · T(gate))) (gated; the gate is rounded to T first and
    product and sum are `T` operations) or x' = T(x + residual); x' is written out;
  - LayerNorm of x' in float32: n = (x' − mean)·rsqrt(var + eps), two passes over the row in registers;
  - affine (norm3): T(n·weight + bias); modulated (norm1 / norm2): T(float32(T(n))·(1 + scale) + shift),
    the LayerNorm rounded to T *before* the modulation; neither: T(n).
  Returns the normalised rows, or (x', normalised) with a residual. One read of x (and residual), one or two
  writes, instead of the five to eight full passes with float32 temporaries of the unfused PyTorch ops.
  With `quantize_e4m3=True` the normalised rows come as the fp8 linears' per-token input instead (issue 8):
  (e4m3 codes [rows, C], float32 scale [rows]) = `fp8_linear.quantize_rows_e4m3` of the rounded rows, from
  the row the program holds (amax, a correctly rounded 448/amax, product, saturating RTNE conversion): the
  rows are not written in T and not read again by a quantiser per linear. Needs e4m3 conversion in hardware
  (compute capability >= 8.9) or the interpreter.
* `rms_norm_rope_triton(x, weight, eps, cos=None, sin=None)`: RMSNorm over the whole row (all heads, as
  Wan's q/k norms), n = T(float32(x)·rsqrt(mean(x²) + eps)·weight) with the weight multiply in float32, then
  (with cos/sin [L, D/2] float32) the interleaved 3-D RoPE of every head in float32: channel pair (2p, 2p+1)
  of head h rotated by angle column p mod D/2: (e·cos − o·sin, e·sin + o·cos), rounded to T. One read, one
  write, instead of the two RMSNorm and RoPE passes with float32 temporaries.
* `gated_add_triton(x, y, gate)`: T(x + T(y·T(gate))) — bit-identical to the PyTorch expression.

The PyTorch references `layer_norm_reference`, `rms_norm_rope_reference` and `gated_add_reference` compute
the same with the same rounding points. Kernels are launched with `enable_fp_fusion=False`, so products and
sums round separately as PyTorch's separate operations do. Results equal the references exactly except
where a float32 row reduction (mean, variance, mean square) is summed in another order: its last-bit
difference can move a rounding to T by one unit in the last place, so norm outputs agree within one ulp of
T (before modulation) and the gated add bit for bit.

Layouts: x, residual, y contiguous [B, L, C] (or [M, C] with B = 1); outputs contiguous in x's dtype
(bf16, fp16 or fp32). One program per row, the row padded to a power of two in registers (C ≤ 16384).
GPUs: any CUDA GPU Triton supports (plain loads/stores and reductions, no tensor cores, no descriptors).
Tested on the CPU interpreter (tests/test_fused_norms_interpret.py) against formulas written from the spec,
with ragged widths, batch 2, fp16/fp32/bf16; compiled for sm80 and sm90 without a GPU (Triton 3.9, 2026:
widths 1536 and 5120 take 34-144 registers, no spills, vector loads, no FMA: test_fused_norms_compile.py);
on the GPU by bench/e2e.py (whole-model equality, timing). Not yet timed on a GPU.
Note (Triton 3.9 interpreter, seen 2026): its float32 -> bf16 cast truncates; under TRITON_INTERPRET=1 the
kernels round onto the bf16 grid with integer operations first (`SOFTWARE_BF16`), which the cast then keeps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_linear import E4M3, E4M3_MAX
from .interpreter import interpreting
from .row_quant_reference import AMAX_FLOOR
from .sage_prepass import to_e4m3

MAX_WIDTH = 16384
# Rows up to this many (padded) elements use 4 warps (16 elements a thread); wider ones 8.
FOUR_WARP_WIDTH = 2048
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_E4M3_MAX = tl.constexpr(E4M3_MAX)


@triton.jit
def _round(x, dtype: tl.constexpr, SOFTWARE_BF16: tl.constexpr):
    """float32 -> dtype, round to nearest even (bit trick under the interpreter, see the module notes)."""
    if SOFTWARE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    residual_ptr,
    gate_ptr,
    weight_ptr,
    bias_ptr,
    shift_ptr,
    scale_ptr,
    x_out_ptr,
    out_ptr,
    codes_ptr,
    row_scale_ptr,
    tokens,
    width,
    vector_batch_stride,
    eps,
    BLOCK: tl.constexpr,
    RESIDUAL: tl.constexpr,
    GATED: tl.constexpr,
    AFFINE: tl.constexpr,
    MODULATE: tl.constexpr,
    QUANTIZE: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sample = row // tokens
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    vectors = sample * vector_batch_stride + cols
    if RESIDUAL:
        update = tl.load(residual_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            gate = _round(tl.load(gate_ptr + vectors, mask=mask, other=0.0), dtype, SOFTWARE_BF16)
            update = _round(update * gate.to(tl.float32), dtype, SOFTWARE_BF16).to(tl.float32)
        x = _round(x + update, dtype, SOFTWARE_BF16)
        tl.store(x_out_ptr + row * width + cols, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / width
    centred = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centred * centred, axis=0) / width
    normed = centred * tl.math.rsqrt(variance + eps)
    if AFFINE:
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        normed = normed * weight + bias
    if MODULATE:
        normed = _round(normed, dtype, SOFTWARE_BF16).to(tl.float32)
        scale = tl.load(scale_ptr + vectors, mask=mask, other=0.0)
        shift = tl.load(shift_ptr + vectors, mask=mask, other=0.0)
        normed = normed * (1.0 + scale) + shift
    normed = _round(normed, dtype, SOFTWARE_BF16)
    if QUANTIZE:  # the rounded row, quantised as fp8_linear.quantize_rows_e4m3 does
        values = normed.to(tl.float32)
        row_amax = tl.maximum(tl.max(tl.where(mask, tl.abs(values), 0.0), axis=0), _AMAX_FLOOR)
        amax = tl.zeros([1], tl.float32) + row_amax  # one-element tensors: div_rn takes no scalars
        e4m3_max = tl.full([1], _E4M3_MAX, tl.float32)
        inverse = tl.math.div_rn(e4m3_max, amax)
        quotient = tl.minimum(tl.maximum(values * inverse, -_E4M3_MAX), _E4M3_MAX)
        tl.store(codes_ptr + row * width + cols, to_e4m3(quotient, INTERPRET), mask=mask)
        tl.store(row_scale_ptr + row + tl.arange(0, 1), tl.math.div_rn(amax, e4m3_max))
    else:
        tl.store(out_ptr + row * width + cols, normed, mask=mask)


@triton.jit
def _rms_norm_rope_kernel(
    x_ptr,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    tokens,
    width,
    half_head,
    eps,
    BLOCK_PAIRS: tl.constexpr,
    ROPE: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pairs = tl.arange(0, BLOCK_PAIRS)
    mask = pairs < width // 2
    dtype = out_ptr.dtype.element_ty
    # The row as [pairs, 2]: contiguous (vector) loads, then split into even and odd channels.
    at = 2 * pairs[:, None] + tl.arange(0, 2)[None, :]
    x = tl.load(x_ptr + row * width + at, mask=mask[:, None], other=0.0).to(tl.float32)
    mean_square = tl.sum(tl.sum(x * x, axis=1), axis=0) / width
    rstd = tl.math.rsqrt(mean_square + eps)
    weight = tl.load(weight_ptr + at, mask=mask[:, None], other=0.0).to(tl.float32)
    normed = _round(x * rstd * weight, dtype, SOFTWARE_BF16)
    if ROPE:
        angle_at = (row % tokens) * half_head + pairs % half_head
        cos = tl.load(cos_ptr + angle_at, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + angle_at, mask=mask, other=0.0)
        even, odd = tl.split(normed.to(tl.float32))
        rotated_even = _round(even * cos - odd * sin, dtype, SOFTWARE_BF16)
        rotated_odd = _round(even * sin + odd * cos, dtype, SOFTWARE_BF16)
        normed = tl.join(rotated_even, rotated_odd)
    tl.store(out_ptr + row * width + at, normed, mask=mask[:, None])


@triton.jit
def _gated_add_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    tokens,
    width,
    gate_batch_stride,
    BLOCK: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    gate_at = (row // tokens) * gate_batch_stride + cols
    gate = _round(tl.load(gate_ptr + gate_at, mask=mask, other=0.0), dtype, SOFTWARE_BF16).to(tl.float32)
    update = _round(y * gate, dtype, SOFTWARE_BF16).to(tl.float32)
    tl.store(out_ptr + row * width + cols, _round(x + update, dtype, SOFTWARE_BF16), mask=mask)


def _rows(x: torch.Tensor, name: str = "x") -> tuple[int, int, int]:
    """(rows, tokens per sample, width) of a contiguous [B, L, C] or [M, C] tensor."""
    if x.dim() not in (2, 3) or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [B, L, C] or [M, C] tensor, got {tuple(x.shape)}")
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"rows of {x.shape[-1]} elements exceed the kernels' {MAX_WIDTH}")
    tokens = x.shape[-2]
    return x.numel() // x.shape[-1], tokens, x.shape[-1]


def _check_like_x(other: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """A second row operand (residual, y) must be laid out as x: same shape and dtype, contiguous."""
    _rows(other, name)
    if other.shape != x.shape or other.dtype != x.dtype:
        raise ValueError(f"{name} {tuple(other.shape)} {other.dtype} must match x {tuple(x.shape)} {x.dtype}")


def _per_sample(vector: torch.Tensor, x: torch.Tensor, name: str) -> int:
    """Batch stride of a per-sample vector [B, 1, C] / [B, C] (any batch stride, unit channel stride)."""
    batch = x.shape[0] if x.dim() == 3 else 1
    width = x.shape[-1]
    flat = vector.reshape(vector.shape[0], -1) if vector.dim() == 3 else vector
    if flat.dim() != 2 or flat.shape != (batch, width) or flat.stride(1) != 1:
        raise ValueError(
            f"{name} must be [{batch}, 1, {width}] with unit channel stride, got {tuple(vector.shape)}"
        )
    if flat.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (the modulation is float32), got {flat.dtype}")
    return flat.stride(0) if batch > 1 else 0


def _launch_options(block: int) -> dict:
    return {"num_warps": 4 if block <= FOUR_WARP_WIDTH else 8, "enable_fp_fusion": False}


def _software_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def layer_norm_triton(
    x: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    quantize_e4m3: bool = False,
):
    """LayerNorm (float32) of x or of x + residual[·gate], plain, affine or modulated (module docstring).
    With `quantize_e4m3` the normalised rows come as (e4m3 codes [rows, C], float32 scale per row) instead."""
    rows, tokens, width = _rows(x)
    affine, modulate = weight is not None, shift is not None
    if affine and modulate:
        raise ValueError("give weight/bias (affine) or shift/scale (modulation), not both")
    if (weight is None) != (bias is None) or (shift is None) != (scale is None):
        raise ValueError("weight and bias, and shift and scale, come in pairs")
    if gate is not None and residual is None:
        raise ValueError("a gate needs a residual")
    if residual is not None:
        _check_like_x(residual, x, "residual")
    vectors = {"gate": gate, "shift": shift, "scale": scale}
    strides = {_per_sample(v, x, name) for name, v in vectors.items() if v is not None}
    if len(strides) > 1:
        raise ValueError("gate, shift and scale must share one batch stride (chunks of one modulation)")
    out = x if quantize_e4m3 else torch.empty_like(x)  # x: placeholder, not written
    x_out = torch.empty_like(x) if residual is not None else out
    codes = torch.empty(rows, width, dtype=E4M3, device=x.device) if quantize_e4m3 else x
    row_scale = torch.empty(rows, dtype=torch.float32, device=x.device) if quantize_e4m3 else x
    block = triton.next_power_of_2(width)
    _layer_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        gate if gate is not None else x,
        weight if affine else x,
        bias if affine else x,
        shift if modulate else x,
        scale if modulate else x,
        x_out,
        out,
        codes,
        row_scale,
        tokens,
        width,
        strides.pop() if strides else 0,
        eps,
        BLOCK=block,
        RESIDUAL=residual is not None,
        GATED=gate is not None,
        AFFINE=affine,
        MODULATE=modulate,
        QUANTIZE=quantize_e4m3,
        SOFTWARE_BF16=_software_bf16(x.dtype),
        INTERPRET=interpreting(),
        **_launch_options(block),
    )
    normed = (codes, row_scale) if quantize_e4m3 else out
    return (x_out, normed) if residual is not None else normed


def rms_norm_rope_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over whole rows of x [B, L, C] (float32, weight included), then RoPE per head if cos/sin."""
    rows, tokens, width = _rows(x)
    if width % 2:
        raise ValueError(f"the row width must be even (channel pairs), got {width}")
    rope = cos is not None
    half_head = 1
    if rope:
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != tokens or not cos.is_contiguous():
            raise ValueError(f"cos/sin must be contiguous [L={tokens}, D/2], got {tuple(cos.shape)}")
        half_head = cos.shape[1]
        if width % (2 * half_head) or cos.dtype != torch.float32 or sin.dtype != torch.float32:
            raise ValueError(f"cos/sin [{tokens}, {half_head}] float32 must tile rows of {width} channels")
    out = torch.empty_like(x)
    block = triton.next_power_of_2(width // 2)
    _rms_norm_rope_kernel[(rows,)](
        x,
        weight,
        cos if rope else weight,
        sin if rope else weight,
        out,
        tokens,
        width,
        half_head,
        eps,
        BLOCK_PAIRS=block,
        ROPE=rope,
        SOFTWARE_BF16=_software_bf16(x.dtype),
        **_launch_options(2 * block),
    )
    return out


def gated_add_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y·T(gate) as T operations, x and y [B, L, C] of dtype T, gate float32 [B, 1, C]."""
    rows, tokens, width = _rows(x)
    _check_like_x(y, x, "y")
    out = torch.empty_like(x)
    block = triton.next_power_of_2(width)
    _gated_add_kernel[(rows,)](
        x,
        y,
        gate,
        out,
        tokens,
        width,
        _per_sample(gate, x, "gate"),
        BLOCK=block,
        SOFTWARE_BF16=_software_bf16(x.dtype),
        **_launch_options(block),
    )
    return out


def layer_norm_reference(
    x: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`layer_norm_triton` in PyTorch operations."""
    updated = None
    if residual is not None:
        update = residual if gate is None else residual * gate.to(x.dtype)
        x = updated = x + update
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    normed = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight, bias, eps)
    if shift is not None:
        normed = normed.to(x.dtype).float() * (1 + scale) + shift
    normed = normed.to(x.dtype)
    return normed if updated is None else (updated, normed)


def rms_norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """`rms_norm_rope_triton` in PyTorch operations."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if cos is None:
        return normed
    pairs = normed.float().unflatten(-1, (-1, cos.shape[1], 2))  # [..., L, heads, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-3).to(x.dtype)


def gated_add_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`gated_add_triton` in PyTorch operations."""
    return x + y * gate.to(x.dtype)
