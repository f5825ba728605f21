"""Triton pre-pass of SLA / SageSLA: statistics, pooling, INT8 Q/K, FP8 V and the linear branch
(KERNELS.md §1.2, §1.4, §4.2).

Everything the block-sparse attention kernel consumes, produced per call from bf16 q, k, v in (B, L, H, D):

1. `sequence_stats` = `partial_stats` + `finalize_stats`: one read of k and v (programs over token spans of
   about TOKENS_PER_STATS_PROGRAM tokens in 16-token tiles, deterministic partial sums, 2-D register
   accumulators reduced once at the end) gives column sums of k, per-channel amax of v and, for the SLA
   linear branch, φ(K)ᵀV (a tensor-core dot per tile) and Σφ(K), φ = softmax over D; the finalize kernel
   (one program per head and 16 rows of KV) turns them into k̄, the FP8 scale amax/2.25 and
   KV' = (φ(K)ᵀV)·Wᵀ (proj_l folded in, bf16).
2. `pool_and_quantise` (one program per block of q or k): the pooled mean of the block for the block map
   (over valid tokens only), optionally minus k̄ first (smooth-K), and optionally INT8 per block:
   scale = amax/127 + 1e-7, x̂ = round_half_away(x/scale), stored int8 (N, L, D); the stored scale is
   multiplied by `scale_mul` (sm_scale·log2e for q: the attention kernel then needs one multiply per block
   pair). For q it also writes the linear branch proj_l(O_lin) = φ(q)·KV' / (φ(q)·Z + 1e-5) + b into the
   output tensor, which the attention kernel then accumulates into (keeps the attention epilogue small);
   computed after the quantisation as (e / (e·Z + 1e-5·Σe))·KV' with e = exp(q − max), KV' read through a
   TMA descriptor on Hopper (168 registers instead of 250: 0.195 -> 0.160 ms at 1.3B-480p, 1.38 -> 1.03 ms
   at 14B-720p on an H200).
3. `quantise_values_fp8`: V / s_v -> E4M3 (round to nearest even, saturating), stored transposed and
   zero-padded as (N, D, L_pad), L_pad = ceil(L/128)·128, the K-contiguous layout the FP8 P·V dot wants,
   with the keys of every 16 interleaved (column c holds key `fp8_column_key(c)`): the attention kernel
   permutes the columns of P̃ the same way, which makes its tensor-core operand a register renaming of the
   Q·Kᵀ accumulator (no shuffles; see `sparse_attention`).

Layouts: inputs may be any (B, L, H, D) view whose last dimension is contiguous; N = B·H, n = b·H + h.
Reference: `sla_reference` (`pooled_queries_keys`, `quantize_int8_blocks`, `quantize_values`,
`linear_branch`); tested in tests/test_kernels_interpret.py (TRITON_INTERPRET=1) and on the GPU by
bench/attention.py. Note: Triton's fp32 division is not IEEE-rounded on the GPU; an INT8 value exactly on a
.5 boundary may land one step away from the float reference (covered by the accuracy tolerances).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .descriptors import TensorDescriptor, descriptors_supported
from .interpreter import interpreting
from .sla_reference import LOG2E, V_FP8_MAX, SageRecipe

_V_TILE = 64
_V_PAD = 128  # L_pad multiple; also a multiple of every BLOCK_N the attention kernel uses
TOKENS_PER_STATS_PROGRAM = 1536  # partial_stats' default work per program


def _strides_bhl(x: torch.Tensor) -> tuple[int, int, int]:
    """Element strides (batch, head, token) of a (B, L, H, D) tensor."""
    if x.stride(3) != 1:
        raise ValueError("q, k and v must have a contiguous last (head-dim) axis")
    return x.stride(0), x.stride(2), x.stride(1)


@triton.jit
def to_e4m3(x, INTERPRET: tl.constexpr):
    """fp32 -> E4M3, round to nearest even, saturating at ±448.

    The CPU interpreter (Triton 3.9, seen 2026-11) drops the mantissa carry when rounding up to the next
    power of two (0.4884 -> 0.25), so there x is first rounded onto the E4M3 grid in fp32 arithmetic
    (quantum 2^(e-3), subnormal quantum 2^-9, RTNE through the 1.5·2^23 trick); values on the grid convert
    exactly.
    """
    if INTERPRET:
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(x), 1e-30))), -6.0)
        quantum = tl.exp2(e - 3.0)
        x = ((x / quantum + 12582912.0) - 12582912.0) * quantum
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(tl.float8e4nv)


@triton.jit
def _softmax_rows(x):
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _stats_kernel(
    k_ptr,
    v_ptr,
    ksum_ptr,
    vmax_ptr,
    kv_ptr,
    z_ptr,
    H,
    L,
    tiles_per_split,
    num_splits,
    s_kb,
    s_kh,
    s_kl,
    s_vb,
    s_vh,
    s_vl,
    D: tl.constexpr,
    TILE: tl.constexpr,
    NEED_VMAX: tl.constexpr,
    LINEAR: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    split = tl.program_id(0)
    n = tl.program_id(1)
    b = (n // H).to(tl.int64)
    h = (n % H).to(tl.int64)
    dims = tl.arange(0, D)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    # Element-wise accumulators: one cross-thread reduction at the end instead of one per tile.
    k_sum = tl.zeros([TILE, D], dtype=tl.float32)
    v_max = tl.zeros([TILE, D], dtype=tl.float32)
    z = tl.zeros([TILE, D], dtype=tl.float32)
    kv = tl.zeros([D, D], dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(L, TILE))
    for t in range(first, last):
        rows = t * TILE + tl.arange(0, TILE)
        valid = rows[:, None] < L
        offsets = rows[:, None].to(tl.int64)
        k = tl.load(k_base + offsets * s_kl + dims[None, :], mask=valid, other=0.0).to(tl.float32)
        k_sum += k
        if NEED_VMAX or LINEAR:
            v = tl.load(v_base + offsets * s_vl + dims[None, :], mask=valid, other=0.0)
        if NEED_VMAX:
            v_max = tl.maximum(v_max, tl.abs(v.to(tl.float32)))
        if LINEAR:
            phi = tl.where(valid, _softmax_rows(k), 0.0)
            z += phi
            if INTERPRET:
                kv = tl.dot(tl.trans(phi), v.to(tl.float32), kv)
            else:
                kv = tl.dot(tl.trans(phi.to(v.dtype)), v, kv)
    out = (n * num_splits + split).to(tl.int64) * D
    tl.store(ksum_ptr + out + dims, tl.sum(k_sum, axis=0))
    if NEED_VMAX:
        tl.store(vmax_ptr + out + dims, tl.max(v_max, axis=0))
    if LINEAR:
        tl.store(z_ptr + out + dims, tl.sum(z, axis=0))
        tl.store(kv_ptr + out * D + dims[:, None] * D + dims[None, :], kv)


@triton.jit
def _finalize_stats_kernel(
    ksum_ptr,
    vmax_ptr,
    kv_ptr,
    z_ptr,
    w_ptr,
    k_mean_ptr,
    v_scale_ptr,
    kv_out_ptr,
    z_out_ptr,
    L,
    num_splits,
    v_max_target,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    NEED_VMAX: tl.constexpr,
    LINEAR: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (n, r): the per-head vectors (r == 0) and rows [r·ROWS, (r+1)·ROWS) of KV' = KV·Wᵀ.
    n = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    dims = tl.arange(0, D)
    if r == 0:
        k_sum = tl.zeros([D], dtype=tl.float32)
        v_max = tl.zeros([D], dtype=tl.float32)
        z = tl.zeros([D], dtype=tl.float32)
        for s in range(num_splits):
            part = (n * num_splits + s) * D
            k_sum += tl.load(ksum_ptr + part + dims)
            if NEED_VMAX:
                v_max = tl.maximum(v_max, tl.load(vmax_ptr + part + dims))
            if LINEAR:
                z += tl.load(z_ptr + part + dims)
        tl.store(k_mean_ptr + n * D + dims, k_sum / L)
        if NEED_VMAX:
            tl.store(v_scale_ptr + n * D + dims, tl.where(v_max > 0, v_max / v_max_target, 1.0))
        if LINEAR:
            tl.store(z_out_ptr + n * D + dims, z)
    if LINEAR:
        rows = r * ROWS + tl.arange(0, ROWS)
        kv = tl.zeros([ROWS, D], dtype=tl.float32)
        for s in range(num_splits):
            kv += tl.load(kv_ptr + ((n * num_splits + s) * D + rows[:, None]) * D + dims[None, :])
        w_t = tl.load(w_ptr + dims[None, :] * D + dims[:, None])  # Wᵀ; W is (out, in) row-major
        kv_proj = tl.dot(kv, w_t, input_precision=PRECISION)
        tl.store(kv_out_ptr + (n * D + rows[:, None]) * D + dims[None, :], kv_proj.to(tl.bfloat16))


@triton.jit
def _pool_quantise_kernel(
    x_ptr,
    mean_ptr,
    pooled_ptr,
    x8_ptr,
    scale_ptr,
    kv_src,
    z_ptr,
    bias_ptr,
    out_ptr,
    H,
    L,
    num_blocks,
    s_b,
    s_h,
    s_l,
    s_ob,
    s_oh,
    s_ol,
    scale_mul,
    D: tl.constexpr,
    BLK: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr,
    QUANT: tl.constexpr,
    LINEAR: tl.constexpr,
    KV_DESC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    blk = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    b = (n // H).to(tl.int64)
    h = (n % H).to(tl.int64)
    dims = tl.arange(0, D)
    rows = blk * BLK + tl.arange(0, BLK)
    valid = rows[:, None] < L
    offsets = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + b * s_b + h * s_h + offsets * s_l + dims[None, :], mask=valid, other=0.0).to(
        tl.float32
    )
    if SUBTRACT_MEAN:
        x = tl.where(valid, x - tl.load(mean_ptr + n64 * D + dims)[None, :], 0.0)
    block = n64 * num_blocks + blk
    tl.store(pooled_ptr + block * D + dims, tl.sum(x, axis=0) / tl.minimum(BLK, L - blk * BLK))
    if QUANT:
        scale = tl.max(tl.max(tl.abs(x), axis=1), axis=0) / 127.0 + 1e-7  # sla_reference.INT8_SCALE_EPS
        y = x / scale
        rounded = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(x8_ptr + (n64 * L + offsets) * D + dims[None, :], rounded.to(tl.int8), mask=valid)
        tl.store(scale_ptr + block, scale * scale_mul)
    if LINEAR:
        # After the quantisation, so that x dies into the feature map before the product; the normaliser
        # is folded into the product's left operand, φ/(φ·z + eps) = e/(e·z + eps·Σe) with e = exp(x − max),
        # so that no fp32 tile outlives the operand; with KV_DESC the KV' tile goes by TMA straight into
        # shared memory instead of through 64 registers (sm90: 250 -> 172 registers, capped at 168 below).
        # One program per block re-reads KV' (32 KB, L2-resident); looping over 4 blocks per program to
        # reuse it was 2.5x slower on H100 (2026-11-21).
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        z = tl.load(z_ptr + n64 * D + dims)
        normaliser = tl.sum(e * z[None, :], axis=1) + 1e-5 * tl.sum(e, axis=1)  # sla_reference.LINEAR_EPS
        weights = e * (1.0 / normaliser)[:, None]
        if KV_DESC:
            kv = kv_src.load([n * D, 0])
        else:
            kv = tl.load(kv_src + n64 * D * D + dims[:, None] * D + dims[None, :])
        if INTERPRET:
            linear = tl.dot(weights, kv.to(tl.float32))
        else:
            linear = tl.dot(weights.to(kv.dtype), kv)
        linear += tl.load(bias_ptr + dims)[None, :]
        out_offsets = b * s_ob + h * s_oh + offsets * s_ol + dims[None, :]
        tl.store(out_ptr + out_offsets, linear.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def fp8_column_key(column):
    """The key whose values column `column` of V̂ᵀ holds (a permutation of each aligned group of 16).

    The FP8 P·V operand from registers holds, per thread, keys 4t..4t+3 (+16) of each 32-key step, while
    the Q·Kᵀ accumulator holds keys 2t, 2t+1 of every 8: the bits (c0, c1, c2, c3) of a column within its
    16-group name key bits (c0, c2, c3, c1). PyTorch twin: `sla_reference.fp8_column_keys`."""
    low = column & 15
    return (column - low) | (low & 1) | ((low >> 2) & 1) << 1 | ((low >> 3) & 1) << 2 | ((low >> 1) & 1) << 3


@triton.jit
def _values_fp8_kernel(
    v_ptr,
    scale_ptr,
    vt_ptr,
    H,
    L,
    L_PAD,
    s_b,
    s_h,
    s_l,
    D: tl.constexpr,
    TILE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    t = tl.program_id(0)
    n = tl.program_id(1)
    b = (n // H).to(tl.int64)
    h = (n % H).to(tl.int64)
    dims = tl.arange(0, D)
    columns = t * TILE + tl.arange(0, TILE)
    rows = fp8_column_key(columns)
    v = tl.load(
        v_ptr + b * s_b + h * s_h + rows[:, None].to(tl.int64) * s_l + dims[None, :],
        mask=(rows < L)[:, None],
        other=0.0,
    ).to(tl.float32)
    scale = tl.load(scale_ptr + n.to(tl.int64) * D + dims)
    v8 = to_e4m3(v / scale[None, :], INTERPRET)
    tl.store(vt_ptr + (n.to(tl.int64) * D + dims[:, None]) * L_PAD + columns[None, :], tl.trans(v8))


@dataclass
class LinearState:
    """The SLA linear branch reduced over all keys, proj_l folded in: KV' = (φ(K)ᵀV)·Wᵀ bf16 (N, D, D),
    Z = Σφ(K) float32 (N, D), bias float32 (D,)."""

    kv: torch.Tensor
    z: torch.Tensor
    bias: torch.Tensor


@dataclass
class SequenceStats:
    """Per-head reductions over all tokens: k̄ (N, D), the FP8 V scale (N, D) or None, the linear state."""

    k_mean: torch.Tensor
    v_scale: torch.Tensor | None
    linear: LinearState | None


@dataclass
class PartialStats:
    """Per-(head, token span) partial reductions written by the stats kernel (float32)."""

    length: int
    k_sum: torch.Tensor  # (N, S, D)
    v_max: torch.Tensor | None  # (N, S, D)
    kv: torch.Tensor | None  # (N, S, D, D)
    z: torch.Tensor | None  # (N, S, D)


def partial_stats(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    fp8_values: bool,
    linear: bool,
    tile: int = 16,
    num_warps: int = 4,
    waves: int | None = None,
) -> PartialStats:
    """One read of k and v; tile / num_warps / waves (programs per multiprocessor) are tuning knobs. By
    default each program reduces about TOKENS_PER_STATS_PROGRAM tokens, rounded to whole waves: on an H200
    (bench/prepass_configs.py, 2026-11-21) 16-token tiles and 4 warps took 0.094 ms at 1.3B-480p (2 waves)
    and 0.68-0.70 ms at 14B-720p (12-16 waves), against 0.142 / 0.98 ms for the earlier 32 x 8 warps x 4."""
    batch, length, heads, d = k.shape
    n = batch * heads
    num_tiles = triton.cdiv(length, tile)
    sms = torch.cuda.get_device_properties(k.device).multi_processor_count if k.is_cuda else 4
    if waves is None:
        waves = max(1, round(n * length / (sms * TOKENS_PER_STATS_PROGRAM)))
    num_splits = triton.cdiv(waves * sms, n)
    num_splits = max(1, min(num_tiles, num_splits))
    tiles_per_split = triton.cdiv(num_tiles, num_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)
    f32 = {"dtype": torch.float32, "device": k.device}
    k_sum = torch.empty((n, num_splits, d), **f32)
    v_max = torch.empty((n, num_splits, d), **f32) if fp8_values else None
    kv = torch.empty((n, num_splits, d, d), **f32) if linear else None
    z = torch.empty((n, num_splits, d), **f32) if linear else None
    _stats_kernel[(num_splits, n)](
        k,
        v,
        k_sum,
        k_sum if v_max is None else v_max,
        k_sum if kv is None else kv,
        k_sum if z is None else z,
        heads,
        length,
        tiles_per_split,
        num_splits,
        *_strides_bhl(k),
        *_strides_bhl(v),
        D=d,
        TILE=tile,
        NEED_VMAX=fp8_values,
        LINEAR=linear,
        INTERPRET=interpreting(),
        num_warps=num_warps,
    )
    return PartialStats(length, k_sum, v_max, kv, z)


def finalize_stats(partial: PartialStats, proj_l: torch.nn.Module | None, rows: int = 16) -> SequenceStats:
    """k̄, the FP8 V scale and KV' = (φ(K)ᵀV)·Wᵀ from the partial sums (N x D/rows programs)."""
    n, num_splits, d = partial.k_sum.shape
    device = partial.k_sum.device
    f32 = {"dtype": torch.float32, "device": device}
    linear = partial.kv is not None
    if linear and proj_l is None:
        raise ValueError("finalize_stats: partial sums of the linear branch need the layer's proj_l")
    k_mean = torch.empty((n, d), **f32)
    v_scale = torch.empty((n, d), **f32) if partial.v_max is not None else None
    state = None
    weight = k_mean
    if linear:
        weight = proj_l.weight.detach().to(**f32).contiguous()
        bias = proj_l.bias
        bias = torch.zeros(d, **f32) if bias is None else bias.detach().to(**f32).contiguous()
        kv_proj = torch.empty((n, d, d), dtype=torch.bfloat16, device=device)
        state = LinearState(kv_proj, torch.empty((n, d), **f32), bias)
    _finalize_stats_kernel[(n, d // rows if linear else 1)](
        partial.k_sum,
        k_mean if partial.v_max is None else partial.v_max,
        k_mean if partial.kv is None else partial.kv,
        k_mean if partial.z is None else partial.z,
        weight,
        k_mean,
        k_mean if v_scale is None else v_scale,
        k_mean if state is None else state.kv,
        k_mean if state is None else state.z,
        partial.length,
        num_splits,
        V_FP8_MAX,
        D=d,
        ROWS=rows,
        NEED_VMAX=v_scale is not None,
        LINEAR=linear,
        PRECISION="ieee" if interpreting() else "tf32",  # KV' is rounded to bf16 afterwards
        num_warps=4,
    )
    return SequenceStats(k_mean, v_scale, state)


def sequence_stats(
    k: torch.Tensor, v: torch.Tensor, *, fp8_values: bool, proj_l: torch.nn.Module | None
) -> SequenceStats:
    """k̄, the FP8 V scale (amax/2.25, when `fp8_values`) and the folded linear state (with proj_l)."""
    partial = partial_stats(k, v, fp8_values=fp8_values, linear=proj_l is not None)
    return finalize_stats(partial, proj_l)


def _pass_warps(blk: int, linear: bool) -> int:
    """4 warps, also for the 128-row k pass (H200, bench/prepass_configs.py: 0.083 vs 0.086 ms with 8 at
    1.3B-480p); 8 where 128+ rows also carry the linear branch (its fp32 tiles need the registers)."""
    return 8 if linear and blk > 64 else 4


def pool_and_quantise(
    x: torch.Tensor,
    blk: int,
    *,
    mean: torch.Tensor | None = None,
    quantise: bool = False,
    scale_mul: float = 1.0,
    linear: LinearState | None = None,
    linear_out: torch.Tensor | None = None,
    num_warps: int | None = None,
    use_desc: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Pooled block means float32 (N, NB, D) of x (minus `mean` (N, D) if given) and optionally INT8 x.

    Returns (pooled, x8 int8 (N, L, D) or None, scale·scale_mul float32 (N, NB) or None). With `linear`, x is
    the query (not smoothed: `mean` must be None) and proj_l(O_lin) is written into `linear_out`
    (B, L, H, D); `use_desc` (default: on Hopper) loads KV' through a TMA descriptor.
    """
    batch, length, heads, d = x.shape
    n = batch * heads
    num_blocks = triton.cdiv(length, blk)
    pooled = torch.empty((n, num_blocks, d), dtype=torch.float32, device=x.device)
    x8 = torch.empty((n, length, d), dtype=torch.int8, device=x.device) if quantise else pooled
    scale = torch.empty((n, num_blocks), dtype=torch.float32, device=x.device) if quantise else pooled
    if linear is not None and linear_out is None:
        raise ValueError(
            "pool_and_quantise: `linear` needs `linear_out`, the tensor to write the branch into"
        )
    if linear is not None and mean is not None:
        raise ValueError("pool_and_quantise: the linear branch takes the unsmoothed query; pass no `mean`")
    out = x if linear_out is None else linear_out
    kv_src = pooled if linear is None else linear.kv
    kv_desc = linear is not None and (descriptors_supported(x.device) if use_desc is None else use_desc)
    if kv_desc:
        kv_src = TensorDescriptor.from_tensor(linear.kv.view(n * d, d), [d, d])
    _pool_quantise_kernel[(num_blocks, n)](
        x,
        pooled if mean is None else mean,
        pooled,
        x8,
        scale,
        kv_src,
        pooled if linear is None else linear.z,
        pooled if linear is None else linear.bias,
        out,
        heads,
        length,
        num_blocks,
        *_strides_bhl(x),
        *_strides_bhl(out),
        scale_mul,
        D=d,
        BLK=blk,
        SUBTRACT_MEAN=mean is not None,
        QUANT=quantise,
        LINEAR=linear is not None,
        KV_DESC=kv_desc,
        INTERPRET=interpreting(),
        num_warps=num_warps or _pass_warps(blk, linear is not None),
        # 168 registers let three 4-warp programs share an sm90 multiprocessor (ptxas: 172 without the cap,
        # no spills with it).
        **({"maxnreg": 168} if kv_desc else {}),
    )
    return pooled, (x8 if quantise else None), (scale if quantise else None)


def quantise_values_fp8(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 V / scale, transposed and zero-padded: (N, D, L_pad) float8_e4m3fn, L_pad = ceil(L/128)·128,
    column c holding key fp8_column_key(c)."""
    batch, length, heads, d = v.shape
    n = batch * heads
    padded = triton.cdiv(length, _V_PAD) * _V_PAD
    vt = torch.empty((n, d, padded), dtype=torch.float8_e4m3fn, device=v.device)
    _values_fp8_kernel[(padded // _V_TILE, n)](
        v,
        scale,
        vt,
        heads,
        length,
        padded,
        *_strides_bhl(v),
        D=d,
        TILE=_V_TILE,
        INTERPRET=interpreting(),
        num_warps=4,
    )
    return vt


@dataclass
class SagePrepared:
    """Operands of the quantised attention kernel and of block selection (see the module docstring)."""

    q8: torch.Tensor  # int8 (N, L, D)
    q_scale: torch.Tensor  # float32 (N, N_Q), includes sm_scale·log2e
    k8: torch.Tensor  # int8 (N, L, D), smoothed
    k_scale: torch.Tensor  # float32 (N, N_K)
    v_fp8: torch.Tensor | None  # float8_e4m3fn (N, D, L_pad), None for the fp16 recipe
    v_scale: torch.Tensor | None  # float32 (N, D), None for the fp16 recipe
    pooled_q: torch.Tensor  # float32 (N, N_Q, D)
    pooled_k: torch.Tensor  # float32 (N, N_K, D), smoothed
    stats: SequenceStats


def sage_prepass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    recipe: SageRecipe,
    *,
    proj_l: torch.nn.Module | None = None,
    linear_out: torch.Tensor | None = None,
) -> SagePrepared:
    """All SageSLA operands from bf16 q, k, v (B, L, H, D) in 5 launches; with proj_l the linear branch is
    written into `linear_out`."""
    fp8 = recipe.pv_dtype == "fp8"
    stats = sequence_stats(k, v, fp8_values=fp8, proj_l=proj_l)
    pooled_q, q8, q_scale = pool_and_quantise(
        q,
        recipe.blkq,
        quantise=True,
        scale_mul=LOG2E / math.sqrt(q.shape[-1]),
        linear=stats.linear,
        linear_out=linear_out,
    )
    pooled_k, k8, k_scale = pool_and_quantise(k, recipe.blkk, mean=stats.k_mean, quantise=True)
    v_fp8 = quantise_values_fp8(v, stats.v_scale) if fp8 else None
    return SagePrepared(q8, q_scale, k8, k_scale, v_fp8, stats.v_scale, pooled_q, pooled_k, stats)
