"""Triton pre-pass of SLA / SageSLA: statistics, pooling, INT8 Q/K and FP8 V (KERNELS.md §1.2, §4.2).

Everything the block-sparse attention kernel consumes, produced per call from bf16 q, k, v in (B, L, H, D):

1. `kv_stats` (one read of k and v, one program per (token span, head), deterministic partial sums):
   column sums of k (-> the smoothing mean k̄), per-channel amax of v (-> the FP8 scale), and for the SLA
   linear branch φ(K)ᵀV (a tensor-core dot per tile) and Σφ(K), φ = softmax over D.
2. `pool_and_quantise` (one program per block of q or k): the pooled mean of the block for the block map
   (over valid tokens only), optionally minus k̄ first (smooth-K), and optionally INT8 per block:
   scale = amax/127 + 1e-7, x̂ = round_half_away(x/scale), stored int8 (N, L, D); the stored scale is
   multiplied by `scale_mul` (sm_scale·log2e for q: the attention kernel then needs one multiply per block
   pair).
3. `quantise_values_fp8`: V / s_v -> E4M3 (round to nearest even, saturating), stored transposed and
   zero-padded as (N, D, L_pad), L_pad = ceil(L/128)·128, the K-contiguous layout the FP8 P·V dot wants.

Layouts: inputs may be any (B, L, H, D) view whose last dimension is contiguous; N = B·H, n = b·H + h.
Reference: `sla_reference` (`pooled_queries_keys`, `quantize_int8_blocks`, `quantize_values`); tested in
tests/test_kernels_interpret.py (TRITON_INTERPRET=1) and on the GPU by bench/attention.py.
Note: Triton's fp32 division is not IEEE-rounded on the GPU; an INT8 value exactly on a .5 boundary may land
one step away from the float reference (harmless, covered by the accuracy tolerances).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .sla_reference import LOG2E, V_FP8_MAX, SageRecipe

_STATS_TILE = 64
_V_TILE = 64
_V_PAD = 128  # L_pad multiple; also a multiple of every BLOCK_N the attention kernel uses


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (bf16 dots must then be done in fp32)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def _kv_stats_kernel(
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
    k_sum = tl.zeros([D], dtype=tl.float32)
    v_max = tl.zeros([D], dtype=tl.float32)
    z = tl.zeros([D], dtype=tl.float32)
    kv = tl.zeros([D, D], dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(L, TILE))
    for t in range(first, last):
        rows = t * TILE + tl.arange(0, TILE)
        valid = rows < L
        k = tl.load(
            k_base + rows[:, None].to(tl.int64) * s_kl + dims[None, :], mask=valid[:, None], other=0.0
        )
        k = k.to(tl.float32)
        k_sum += tl.sum(k, axis=0)
        if NEED_VMAX or LINEAR:
            v = tl.load(
                v_base + rows[:, None].to(tl.int64) * s_vl + dims[None, :], mask=valid[:, None], other=0.0
            )
        if NEED_VMAX:
            v_max = tl.maximum(v_max, tl.max(tl.abs(v.to(tl.float32)), axis=0))
        if LINEAR:
            e = tl.exp(k - tl.max(k, axis=1)[:, None])
            phi = e / tl.sum(e, axis=1)[:, None]
            phi = tl.where(valid[:, None], phi, 0.0)
            z += tl.sum(phi, axis=0)
            if INTERPRET:
                kv = tl.dot(tl.trans(phi), v.to(tl.float32), kv)
            else:
                kv = tl.dot(tl.trans(phi.to(v.dtype)), v, kv)
    out = (n * num_splits + split).to(tl.int64) * D
    tl.store(ksum_ptr + out + dims, k_sum)
    if NEED_VMAX:
        tl.store(vmax_ptr + out + dims, v_max)
    if LINEAR:
        tl.store(z_ptr + out + dims, z)
        tl.store(kv_ptr + out * D + dims[:, None] * D + dims[None, :], kv)


@triton.jit
def _pool_quantise_kernel(
    x_ptr,
    mean_ptr,
    pooled_ptr,
    x8_ptr,
    scale_ptr,
    H,
    L,
    num_blocks,
    s_b,
    s_h,
    s_l,
    scale_mul,
    D: tl.constexpr,
    BLK: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr,
    QUANT: tl.constexpr,
):
    blk = tl.program_id(0)
    n = tl.program_id(1)
    b = (n // H).to(tl.int64)
    h = (n % H).to(tl.int64)
    dims = tl.arange(0, D)
    rows = blk * BLK + tl.arange(0, BLK)
    valid = rows < L
    x = tl.load(
        x_ptr + b * s_b + h * s_h + rows[:, None].to(tl.int64) * s_l + dims[None, :],
        mask=valid[:, None],
        other=0.0,
    ).to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(mean_ptr + n.to(tl.int64) * D + dims)
        x = tl.where(valid[:, None], x - mean[None, :], 0.0)
    count = tl.minimum(BLK, L - blk * BLK)
    block = n.to(tl.int64) * num_blocks + blk
    tl.store(pooled_ptr + block * D + dims, tl.sum(x, axis=0) / count)
    if QUANT:
        scale = tl.max(tl.max(tl.abs(x), axis=1), axis=0) / 127.0 + 1e-7  # sla_reference.INT8_SCALE_EPS
        y = x / scale
        rounded = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(
            x8_ptr + (n.to(tl.int64) * L + rows[:, None]) * D + dims[None, :],
            rounded.to(tl.int8),
            mask=valid[:, None],
        )
        tl.store(scale_ptr + block, scale * scale_mul)


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
    rows = t * TILE + tl.arange(0, TILE)
    v = tl.load(
        v_ptr + b * s_b + h * s_h + rows[:, None].to(tl.int64) * s_l + dims[None, :],
        mask=(rows < L)[:, None],
        other=0.0,
    ).to(tl.float32)
    scale = tl.load(scale_ptr + n.to(tl.int64) * D + dims)
    v8 = to_e4m3(v / scale[None, :], INTERPRET)
    tl.store(vt_ptr + (n.to(tl.int64) * D + dims[:, None]) * L_PAD + rows[None, :], tl.trans(v8))


@dataclass
class KVStats:
    """Per-head reductions over all tokens, float32: k̄, v amax, Σφ(K) (N, D) and φ(K)ᵀV (N, D, D)."""

    k_mean: torch.Tensor
    v_amax: torch.Tensor | None
    kv: torch.Tensor | None
    z: torch.Tensor | None


def kv_stats(k: torch.Tensor, v: torch.Tensor, *, need_vmax: bool, linear: bool) -> KVStats:
    """Column sums of k, channel amax of v and the linear-branch state, in one read of k and v."""
    batch, length, heads, d = k.shape
    n = batch * heads
    num_tiles = triton.cdiv(length, _STATS_TILE)
    sms = torch.cuda.get_device_properties(k.device).multi_processor_count if k.is_cuda else 4
    # Enough programs for two waves on the GPU; partial sums keep the reduction deterministic.
    num_splits = max(1, min(num_tiles, triton.cdiv(2 * sms, n)))
    tiles_per_split = triton.cdiv(num_tiles, num_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)
    f32 = {"dtype": torch.float32, "device": k.device}
    k_sum = torch.empty((n, num_splits, d), **f32)
    v_max = torch.empty((n, num_splits, d), **f32) if need_vmax else k_sum
    kv = torch.empty((n, num_splits, d, d), **f32) if linear else k_sum
    z = torch.empty((n, num_splits, d), **f32) if linear else k_sum
    _kv_stats_kernel[(num_splits, n)](
        k,
        v,
        k_sum,
        v_max,
        kv,
        z,
        heads,
        length,
        tiles_per_split,
        num_splits,
        *_strides_bhl(k),
        *_strides_bhl(v),
        D=d,
        TILE=_STATS_TILE,
        NEED_VMAX=need_vmax,
        LINEAR=linear,
        INTERPRET=interpreting(),
        num_warps=8,
    )
    return KVStats(
        k_mean=k_sum.sum(dim=1) / length,
        v_amax=v_max.amax(dim=1) if need_vmax else None,
        kv=kv.sum(dim=1) if linear else None,
        z=z.sum(dim=1) if linear else None,
    )


def pool_and_quantise(
    x: torch.Tensor,
    blk: int,
    *,
    mean: torch.Tensor | None = None,
    quantise: bool = False,
    scale_mul: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Pooled block means float32 (N, NB, D) of x (minus `mean` (N, D) if given) and optionally INT8 x.

    Returns (pooled, x8 int8 (N, L, D) or None, scale·scale_mul float32 (N, NB) or None).
    """
    batch, length, heads, d = x.shape
    n = batch * heads
    num_blocks = triton.cdiv(length, blk)
    pooled = torch.empty((n, num_blocks, d), dtype=torch.float32, device=x.device)
    x8 = torch.empty((n, length, d), dtype=torch.int8, device=x.device) if quantise else pooled
    scale = torch.empty((n, num_blocks), dtype=torch.float32, device=x.device) if quantise else pooled
    _pool_quantise_kernel[(num_blocks, n)](
        x,
        pooled if mean is None else mean,
        pooled,
        x8,
        scale,
        heads,
        length,
        num_blocks,
        *_strides_bhl(x),
        scale_mul,
        D=d,
        BLK=blk,
        SUBTRACT_MEAN=mean is not None,
        QUANT=quantise,
        num_warps=4,
    )
    return pooled, (x8 if quantise else None), (scale if quantise else None)


def value_scale(v_amax: torch.Tensor) -> torch.Tensor:
    """Per-channel FP8 scale amax/2.25 (all-zero channels get 1 so that 0/scale stays 0)."""
    return torch.where(v_amax > 0, v_amax / V_FP8_MAX, torch.ones_like(v_amax))


def quantise_values_fp8(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 V / scale, transposed and zero-padded: (N, D, L_pad) float8_e4m3fn, L_pad = ceil(L/128)·128."""
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
    stats: KVStats


def sage_prepass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, recipe: SageRecipe, *, linear: bool
) -> SagePrepared:
    """All SageSLA operands from bf16 q, k, v (B, L, H, D): 3 to 4 launches plus tiny reductions."""
    fp8 = recipe.pv_dtype == "fp8"
    stats = kv_stats(k, v, need_vmax=fp8, linear=linear)
    sm_scale_log2 = LOG2E / math.sqrt(q.shape[-1])
    pooled_q, q8, q_scale = pool_and_quantise(q, recipe.blkq, quantise=True, scale_mul=sm_scale_log2)
    pooled_k, k8, k_scale = pool_and_quantise(k, recipe.blkk, mean=stats.k_mean, quantise=True)
    v_scale = value_scale(stats.v_amax) if fp8 else None
    v_fp8 = quantise_values_fp8(v, v_scale) if fp8 else None
    return SagePrepared(q8, q_scale, k8, k_scale, v_fp8, v_scale, pooled_q, pooled_k, stats)
