"""Float64 implementations of the SLA formulas (TURBODIFFUSION.md §9.3-9.6), written independently of the
library from the spec text, used as the judge by the attention tests and the GPU benchmark.

Straightforward dense forms: the block map expanded to a token mask, softmax over the masked logits, one chunk
of query rows at a time (so real sizes fit on a GPU). Layout (B, L, H, D) in, float64 (B, L, H, D) out.
"""

from __future__ import annotations

import math

import torch


def block_scores(q: torch.Tensor, k: torch.Tensor, blkq: int, blkk: int) -> torch.Tensor:
    """S_ij = mean(q over query block i) · mean(k - mean_L k over key block j), float64 (B, H, N_Q, N_K)."""
    q = q.double().transpose(1, 2)
    k = k.double().transpose(1, 2)
    k = k - k.mean(dim=2, keepdim=True)
    length = q.shape[2]

    def pool(x: torch.Tensor, blk: int) -> torch.Tensor:
        blocks = [x[:, :, s : s + blk].mean(dim=2) for s in range(0, length, blk)]
        return torch.stack(blocks, dim=2)

    return pool(q, blkq) @ pool(k, blkk).transpose(-1, -2)


def top_k_count(num_key_blocks: int, ratio: float) -> int:
    return min(num_key_blocks, int(ratio * num_key_blocks))


def block_mask(q: torch.Tensor, k: torch.Tensor, blkq: int, blkk: int, ratio: float) -> torch.Tensor:
    """Boolean (B, H, N_Q, N_K): the top-k_sel key blocks of every query block by float64 score."""
    scores = block_scores(q, k, blkq, blkk)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    count = top_k_count(scores.shape[-1], ratio)
    if count:
        mask.scatter_(-1, scores.topk(count, dim=-1).indices, True)
    return mask


def mask_from_lut(lut: torch.Tensor, batch: int, num_key_blocks: int) -> torch.Tensor:
    """(B, H, N_Q, N_K) mask from a library LUT (B·H, N_Q, k_sel)."""
    n, nq, _ = lut.shape
    mask = torch.zeros((n, nq, num_key_blocks), dtype=torch.bool, device=lut.device)
    mask.scatter_(-1, lut.long(), True)
    return mask.view(batch, n // batch, nq, num_key_blocks)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    blkq: int,
    blkk: int,
    row_chunk: int = 1024,
) -> torch.Tensor:
    """softmax(q kᵀ/√D restricted to the selected blocks) v in float64; None = dense; empty rows give 0."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    length, d = q.shape[2], q.shape[3]
    out = torch.empty_like(q)
    key_block = torch.arange(length, device=q.device) // blkk
    for s in range(0, length, row_chunk):
        logits = q[:, :, s : s + row_chunk] @ k.transpose(-1, -2) / math.sqrt(d)
        if mask is not None:
            rows = torch.arange(s, min(s + row_chunk, length), device=q.device) // blkq
            allowed = mask[:, :, rows][..., key_block]
            logits = logits.masked_fill(~allowed, -math.inf)
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out[:, :, s : s + row_chunk] = weights @ v
    return out.transpose(1, 2)


def linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight, bias) -> torch.Tensor:
    """O_l = φ(Q)(φ(K)ᵀV) / (1e-5 + φ(Q)·Σφ(K)), φ = softmax over D, then O_l Wᵀ + b (§9.5), float64."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    phi_q = torch.softmax(q, dim=-1)
    phi_k = torch.softmax(k, dim=-1)
    kv = phi_k.transpose(-1, -2) @ v
    z = phi_k.sum(dim=2, keepdim=True)
    o = (phi_q @ kv) / (1e-5 + (phi_q * z).sum(dim=-1, keepdim=True))
    o = o @ weight.detach().double().T + bias.detach().double()
    return o.transpose(1, 2)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.double().flatten(), ref.double().flatten(), dim=0))


def selection_mismatches(lut: torch.Tensor, scores: torch.Tensor, rel_tol: float = 1e-4) -> int:
    """Disagreements with a float64 top-k, ignoring blocks whose score is within rel_tol of the k-th score.

    lut (B·H, N_Q, k_sel) from the library; scores float64 (B, H, N_Q, N_K) from `block_scores`.
    """
    scores = scores.reshape(-1, *scores.shape[-2:])
    count = lut.shape[-1]
    if count == 0:
        return 0
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    chosen.scatter_(-1, lut.long(), True)
    kth = scores.topk(count, dim=-1).values[..., -1:]
    tolerance = rel_tol * scores.abs().amax(dim=-1, keepdim=True)
    should = scores > kth + tolerance
    should_not = scores < kth - tolerance
    return int(((should & ~chosen) | (should_not & chosen)).sum())
