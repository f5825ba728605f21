"""Triton block selection for SLA / SageSLA: block scores and top-k per query block -> LUT + count.

Computes, per head n and query block i, the k_sel key blocks j with the largest score pq[n, i]·pk[n, j]
(TURBODIFFUSION.md §9.3, KERNELS.md §4.2 step 4). pq / pk are the pooled queries and pooled smoothed keys,
float32, produced by `sage_prepass`.

Contract
* Inputs: pq float32 (N, N_Q, D), pk float32 (N, N_K, D), contiguous; D a power of two.
* Output: LUT int32 (N, N_Q, k_sel) with the selected key-block ids in ascending order, count int32 (N, N_Q)
  (always k_sel; kept so the attention kernel can run rows of different lengths).
* Scores are exact float32 dot products (`input_precision="ieee"`), not bf16 as in the reference, so the
  selection equals a float64 top-k except on near-ties. Ties at the k-th value keep the lowest block ids
  (torch.topk breaks them arbitrarily; never compare LUTs bitwise with another implementation's).
* Two launches: a tiled score GEMM into a float32 scratch (N, N_Q, N_K padded to a power of two with -inf),
  then one program per (query block, head) that sorts its row (bitonic `tl.sort`), finds the k-th largest
  value and scatters the selected ids through a prefix sum, which yields ascending order for free.
* Tested: tests/test_kernels_interpret.py (TRITON_INTERPRET=1, CPU) against a float64 top-k;
  bench/attention.py on H100 at real sizes. Reference: `sla_reference.select_blocks`.
* Limit: N_K padded to a power of two must fit one program's registers (N_K <= 8192 covers every Wan shape:
  720p with 64-token key blocks has 1182).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    scores = tl.dot(pq, tl.trans(pk), input_precision="ieee")
    scores = tl.where(cols[None, :] < num_k_blocks, scores, float("-inf"))
    tl.store(
        scores_ptr + (n * num_q_blocks + rows[:, None]) * padded_k_blocks + cols[None, :],
        scores,
        mask=(rows[:, None] < num_q_blocks) & (cols[None, :] < padded_k_blocks),
    )


@triton.jit
def _top_k_kernel(scores_ptr, lut_ptr, count_ptr, num_q_blocks, k_sel, PADDED_K: tl.constexpr):
    row = tl.program_id(1).to(tl.int64) * num_q_blocks + tl.program_id(0)
    ids = tl.arange(0, PADDED_K)
    scores = tl.load(scores_ptr + row * PADDED_K + ids)
    ordered = tl.sort(scores, descending=True)
    kth = tl.max(tl.where(ids == k_sel - 1, ordered, float("-inf")), axis=0)
    above = scores > kth
    at_kth = scores == kth
    still_needed = k_sel - tl.sum(above.to(tl.int32), axis=0)
    tie_rank = tl.cumsum(at_kth.to(tl.int32), axis=0) - 1
    chosen = above | (at_kth & (tie_rank < still_needed))
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(lut_ptr + row * k_sel + slot, ids, mask=chosen)
    tl.store(count_ptr + row, k_sel)


def select_blocks(pq: torch.Tensor, pk: torch.Tensor, k_sel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k_sel key blocks per query block: (LUT int32 (N, N_Q, k_sel) ascending, count int32 (N, N_Q))."""
    n, num_q, d = pq.shape
    num_k = pk.shape[1]
    if not 0 <= k_sel <= num_k:
        raise ValueError(f"k_sel must be in [0, {num_k}] (the number of key blocks), got {k_sel}")
    counts = torch.full((n, num_q), k_sel, dtype=torch.int32, device=pq.device)
    lut = torch.empty((n, num_q, k_sel), dtype=torch.int32, device=pq.device)
    if k_sel == 0:
        return lut, counts
    padded = max(16, triton.next_power_of_2(num_k))
    scores = torch.empty((n, num_q, padded), dtype=torch.float32, device=pq.device)
    grid = (triton.cdiv(num_q, _SCORE_TILE), triton.cdiv(padded, _SCORE_TILE), n)
    _block_scores_kernel[grid](
        pq.contiguous(), pk.contiguous(), scores, num_q, num_k, padded, D=d, TILE=_SCORE_TILE
    )
    _top_k_kernel[(num_q, n)](scores, lut, counts, num_q, k_sel, PADDED_K=padded, num_warps=4)
    return lut, counts
