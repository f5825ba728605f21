"""Triton block selection for SLA / SageSLA: block scores and top-k per query block -> LUT + count.

Computes, per head n and query block i, the k_sel key blocks j with the largest score pq[n, i]·pk[n, j]
(TURBODIFFUSION.md §9.3, KERNELS.md §4.2 step 4). pq / pk are the pooled queries and pooled smoothed keys,
float32, produced by `sage_prepass`.

Contract
* Inputs: pq float32 (N, N_Q, D), pk float32 (N, N_K, D), contiguous; D a power of two.
* Output: LUT int32 (N, N_Q, k_sel) with the selected key-block ids in ascending order, count int32 (N, N_Q)
  (always k_sel; kept so the attention kernel can run rows of different lengths).
* Scores are float32-accurate dot products (tf32x3 on the GPU, ieee in the interpreter), not bf16 as in the
  reference, so the selection equals a float64 top-k except on near-ties. Ties at the k-th value keep the
  lowest block ids (torch.topk breaks them arbitrarily; never compare LUTs bitwise with another
  implementation's).
* Two launches: a tiled score GEMM into a float32 scratch (N, N_Q, N_K padded to a power of two with -inf),
  then one-warp programs (one row each by default) that find each row's k-th largest score by radix
  select (32 counting passes over the order-preserving integer image of the scores; a bitonic `tl.sort`
  per row took 16.7 ms at 14B-720p on H100, 2026-11-21) and scatter the selected ids through a prefix sum
  (ascending order for free).
* Tested: tests/test_kernels_interpret.py (TRITON_INTERPRET=1, CPU) against a float64 top-k;
  bench/attention.py on H100 at real sizes. Reference: `sla_reference.select_blocks`.
* Limit: N_K padded to a power of two must fit one program's registers (N_K <= 8192 covers every Wan shape:
  720p with 64-token key blocks has 1182).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpreting

_SCORE_TILE = 64


@triton.jit
def _block_scores_kernel(
    pq_ptr,
    pk_ptr,
    scores_ptr,
    num_q_blocks,
    num_k_blocks,
    padded_k_blocks,
    D: tl.constexpr,
    TILE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile_q = tl.program_id(0)
    tile_k = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    rows = tile_q * TILE + tl.arange(0, TILE)
    cols = tile_k * TILE + tl.arange(0, TILE)
    dims = tl.arange(0, D)
    pq = tl.load(
        pq_ptr + (n * num_q_blocks + rows[:, None]) * D + dims[None, :],
        mask=rows[:, None] < num_q_blocks,
        other=0.0,
    )
    pk = tl.load(
        pk_ptr + (n * num_k_blocks + cols[:, None]) * D + dims[None, :],
        mask=cols[:, None] < num_k_blocks,
        other=0.0,
    )
    scores = tl.dot(pq, tl.trans(pk), input_precision=PRECISION)
    scores = tl.where(cols[None, :] < num_k_blocks, scores, float("-inf"))
    tl.store(
        scores_ptr + (n * num_q_blocks + rows[:, None]) * padded_k_blocks + cols[None, :],
        scores,
        mask=(rows[:, None] < num_q_blocks) & (cols[None, :] < padded_k_blocks),
    )


@triton.jit
def _top_k_kernel(
    scores_ptr, lut_ptr, count_ptr, num_rows, k_sel, ROWS: tl.constexpr, PADDED_K: tl.constexpr
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = rows < num_rows
    rows = rows.to(tl.int64)
    ids = tl.arange(0, PADDED_K)
    scores = tl.load(scores_ptr + rows[:, None] * PADDED_K + ids[None, :], mask=live[:, None], other=0.0)
    # Order-preserving map of float32 onto int32: negatives get their magnitude bits flipped.
    bits = scores.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    # Radix select: the largest threshold t with count(key >= t) >= k_sel, decided one bit at a time from
    # the top (sign first), is exactly the k-th largest key (32 counting passes instead of a sort).
    non_negative = tl.sum((key >= 0).to(tl.int32), axis=1)
    kth = tl.where(non_negative >= k_sel, 0, -2147483648)
    for i in tl.static_range(31):
        candidate = kth + (1 << (30 - i))
        count = tl.sum((key >= candidate[:, None]).to(tl.int32), axis=1)
        kth = tl.where(count >= k_sel, candidate, kth)
    above = key > kth[:, None]
    at_kth = key == kth[:, None]
    still_needed = k_sel - tl.sum(above.to(tl.int32), axis=1)
    tie_rank = tl.cumsum(at_kth.to(tl.int32), axis=1) - 1
    chosen = above | (at_kth & (tie_rank < still_needed[:, None]))
    slot = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(lut_ptr + rows[:, None] * k_sel + slot, ids[None, :], mask=chosen & live[:, None])
    tl.store(count_ptr + rows, k_sel, mask=live)


def select_blocks(pq: torch.Tensor, pk: torch.Tensor, k_sel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k_sel key blocks per query block: (LUT int32 (N, N_Q, k_sel) ascending, count int32 (N, N_Q))."""
    n, num_q, d = pq.shape
    num_k = pk.shape[1]
    if not 0 <= k_sel <= num_k:
        raise ValueError(f"k_sel must be in [0, {num_k}] (the number of key blocks), got {k_sel}")
    if k_sel == 0:
        empty = torch.empty((n, num_q, 0), dtype=torch.int32, device=pq.device)
        return empty, torch.zeros((n, num_q), dtype=torch.int32, device=pq.device)
    scores = block_scores(pq, pk)
    return top_k_lut(scores, k_sel, num_q)


def block_scores(pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    """pq·pkᵀ float32 (N, N_Q, N_K padded to a power of two >= 16, padding -inf)."""
    n, num_q, d = pq.shape
    num_k = pk.shape[1]
    padded = max(16, triton.next_power_of_2(num_k))
    scores = torch.empty((n, num_q, padded), dtype=torch.float32, device=pq.device)
    grid = (triton.cdiv(num_q, _SCORE_TILE), triton.cdiv(padded, _SCORE_TILE), n)
    # tf32x3 (three tf32 products) is float32-accurate on tensor cores; the interpreter only knows ieee.
    precision = "ieee" if interpreting() else "tf32x3"
    _block_scores_kernel[grid](
        pq.contiguous(),
        pk.contiguous(),
        scores,
        num_q,
        num_k,
        padded,
        D=d,
        TILE=_SCORE_TILE,
        PRECISION=precision,
    )
    return scores


def top_k_lut(
    scores: torch.Tensor, k_sel: int, num_q: int, rows: int = 1, num_warps: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """LUT + count from padded scores (N, N_Q, P), see `select_blocks`; needs 1 <= k_sel <= N_K.

    One row and one warp per program by default: each of the 32 counting passes then reduces within the
    warp (shuffles) instead of across warps through shared memory and a barrier (H200, bench/topk_configs.py:
    0.436 vs 1.176 ms at 14B-720p, 0.020 vs 0.027 ms at 1.3B-480p for the former 8 rows x 8 warps).
    `rows` (rows per program) and `num_warps` are tuning knobs."""
    n, _, padded = scores.shape
    lut = torch.empty((n, num_q, k_sel), dtype=torch.int32, device=scores.device)
    counts = torch.empty((n, num_q), dtype=torch.int32, device=scores.device)
    _top_k_kernel[(triton.cdiv(n * num_q, rows),)](
        scores, lut, counts, n * num_q, k_sel, ROWS=rows, PADDED_K=padded, num_warps=num_warps
    )
    return lut, counts
