"""PyTorch reference of SLA and SageSLA self-attention (TURBODIFFUSION.md §9-10, KERNELS.md §1).

This is the path used wherever the Triton kernels cannot run (no CUDA GPU, no or too old Triton), and the
judge the kernels are tested against. It imports nothing but torch, so it works on any device and dtype.

Contract
* Public ops `sla_attention_reference` / `sagesla_attention_reference` take q, k, v in (B, L, H, D) and return
  (B, L, H, D) in q's dtype. Helpers work on heads-first tensors (N, L, D) with N = B·H.
* Arithmetic is float32 (float64 when the inputs are float64); the TurboDiffusion module rounds its pooled
  means, scores and linear branch to bf16 - we keep them in float32, so selections differ from the reference
  only on near-ties.
* Block map (§9.3): pooled q per query block, pooled (k - mean_L k) per key block (ragged last blocks divide
  by their valid count), scores pq·pkᵀ, k_sel = min(N_K, int(topk·N_K)) largest per row; the LUT holds
  absolute key-block ids in ascending order, int32 (N, N_Q, k_sel), with a per-row count int32 (N, N_Q).
* k_sel = 0 (tiny sequences): the sparse branch outputs exactly 0 (TurboDiffusion divides 0 by 0 and gets
  NaN); the op then returns the linear branch alone.
* `sagesla` emulates the quantised kernels: INT8 per-block Q and smoothed K (scale amax/127 + 1e-7, round
  half away from zero), V in FP8 E4M3 per channel with scale amax/2.25 (or plain fp16 on Ampere), P scaled by
  2^8.807 into the E4M3 range before the P·V product, online softmax in fp32 over the LUT in ascending order.
  It does not emulate Hopper's reduced-precision FP8 accumulator (fp32 here).
* Memory: the blocked loops never form an L×L matrix; the largest temporary is about N·L·BLKK floats (or a
  bounded chunk of gathered key blocks), so real sizes run on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG2E = 1.4426950408889634
# log2(448): P̃ = 2^(s - m + 8.807) fills the E4M3 range [0, 448] (SageAttention's S_FP8_OFFSET).
FP8_P_OFFSET = 8.807
# V is scaled per channel to at most 2.25 (TurboDiffusion's choice on every FP8 arch, KERNELS.md §1.2).
V_FP8_MAX = 2.25
INT8_SCALE_EPS = 1e-7
LINEAR_EPS = 1e-5
# Upper bound on the elements of one chunk of gathered keys in `block_sparse_attention` (~256 MB float32).
_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class SageRecipe:
    """Per-architecture SageSLA choices (TURBODIFFUSION.md §10): block-map sizes and P·V operand format."""

    blkq: int
    blkk: int
    pv_dtype: str  # "fp8" (E4M3 V, P offset 8.807) or "fp16" (Ampere: V and P in fp16, no offset)


HOPPER_RECIPE = SageRecipe(blkq=64, blkk=128, pv_dtype="fp8")
AMPERE_RECIPE = SageRecipe(blkq=128, blkk=64, pv_dtype="fp16")
DEFAULT_RECIPE = SageRecipe(blkq=128, blkk=64, pv_dtype="fp8")
SLA_BLOCKS = (128, 64)  # (BLKQ, BLKK) of TurboDiffusion's bf16 `sla` path


def sage_recipe(capability: tuple[int, int] | None) -> SageRecipe:
    """The recipe TurboDiffusion uses on a GPU of this compute capability (None: no GPU, Hopper numerics)."""
    if capability is None or capability == (9, 0):
        return HOPPER_RECIPE
    if capability[0] == 8 and capability[1] in (0, 6, 7):
        return AMPERE_RECIPE
    return DEFAULT_RECIPE


def selected_block_count(num_key_blocks: int, topk: float) -> int:
    """k_sel = min(N_K, int(topk·N_K)), exactly as the reference computes it."""
    return min(num_key_blocks, int(topk * num_key_blocks))


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> (B·H, L, D)."""
    b, l, h, d = x.shape
    return x.transpose(1, 2).reshape(b * h, l, d)


def tokens_first(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B·H, L, D) -> (B, L, H, D)."""
    n, l, d = x.shape
    return x.reshape(batch, n // batch, l, d).transpose(1, 2)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pad_tokens(x: torch.Tensor, blk: int) -> torch.Tensor:
    """Zero-pad (N, L, D) to a whole number of blocks and view it as (N, num_blocks, blk, D)."""
    n, l, d = x.shape
    nb = math.ceil(l / blk)
    return F.pad(x, (0, 0, 0, nb * blk - l)).view(n, nb, blk, d)


def block_means(x: torch.Tensor, blk: int) -> torch.Tensor:
    """Mean of each block of `blk` tokens of (N, L, D); the ragged last block divides by its valid count."""
    l = x.shape[1]
    sums = _pad_tokens(x, blk).sum(dim=2)
    counts = torch.full((sums.shape[1],), blk, dtype=sums.dtype, device=x.device)
    counts[-1] = l - (sums.shape[1] - 1) * blk
    return sums / counts[:, None]


def pooled_queries_keys(qh: torch.Tensor, kh: torch.Tensor, blkq: int, blkk: int):
    """Pooled q per query block and pooled smoothed k (k - mean_L k) per key block, in float32/64."""
    ct = compute_dtype(qh)
    q = qh.to(ct)
    k = kh.to(ct)
    k_smooth = k - k.mean(dim=1, keepdim=True)
    return block_means(q, blkq), block_means(k_smooth, blkk)


def select_blocks(pq: torch.Tensor, pk: torch.Tensor, k_sel: int):
    """Top-k_sel key blocks per query block by pq·pkᵀ: (LUT int32 ascending (N, N_Q, k_sel), count)."""
    n, nqb = pq.shape[:2]
    counts = torch.full((n, nqb), k_sel, dtype=torch.int32, device=pq.device)
    if k_sel == 0:
        return torch.zeros((n, nqb, 0), dtype=torch.int32, device=pq.device), counts
    scores = pq @ pk.transpose(1, 2)
    lut = torch.topk(scores, k_sel, dim=-1, sorted=False).indices.sort(dim=-1).values
    return lut.to(torch.int32), counts


def block_map(qh: torch.Tensor, kh: torch.Tensor, blkq: int, blkk: int, topk: float):
    """Block selection of §9.3 on heads-first q, k: (LUT, count)."""
    pq, pk = pooled_queries_keys(qh, kh, blkq, blkk)
    return select_blocks(pq, pk, selected_block_count(pk.shape[1], topk))


def block_sparse_attention(
    qh: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    lut: torch.Tensor,
    counts: torch.Tensor,
    blkq: int,
    blkk: int,
) -> torch.Tensor:
    """Exact softmax attention of each query block over its selected key blocks, scale 1/sqrt(D).

    Heads-first (N, L, D) in, (N, L, D) out in float32/64. Rows whose selection is empty give 0.
    """
    ct = compute_dtype(qh)
    n, l, d = qh.shape
    q = _pad_tokens(qh.to(ct), blkq)
    k = _pad_tokens(kh.to(ct), blkk)
    v = _pad_tokens(vh.to(ct), blkk)
    nqb, nkb, k_sel = q.shape[1], k.shape[1], lut.shape[-1]
    out = torch.zeros_like(q)
    if k_sel == 0:
        return out.view(n, -1, d)[:, :l]
    key_valid = (torch.arange(nkb * blkk, device=qh.device) < l).view(nkb, blkk)
    rows = torch.arange(n, device=qh.device)[:, None, None]
    chunk = max(1, _CHUNK_ELEMENTS // (n * k_sel * blkk * (2 * d + blkq)))
    for start in range(0, nqb, chunk):
        idx = lut[:, start : start + chunk].long()
        c = idx.shape[1]
        keys = k[rows, idx].reshape(n, c, k_sel * blkk, d)
        values = v[rows, idx].reshape(n, c, k_sel * blkk, d)
        in_count = torch.arange(k_sel, device=qh.device) < counts[:, start : start + c, None]
        valid = (key_valid[idx] & in_count[..., None]).reshape(n, c, 1, k_sel * blkk)
        logits = torch.einsum("ncqd,nckd->ncqk", q[:, start : start + c], keys) / math.sqrt(d)
        logits = logits.masked_fill(~valid, -math.inf)
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out[:, start : start + c] = torch.einsum("ncqk,nckd->ncqd", weights, values)
    return out.view(n, -1, d)[:, :l]


def linear_branch(
    qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, proj_l: torch.nn.Module | None
) -> torch.Tensor:
    """proj_l(φ(Q)(φ(K)ᵀV) / (φ(Q)·Σφ(K) + 1e-5)), φ = softmax over D (§9.5); zeros when proj_l is None."""
    ct = compute_dtype(qh)
    if proj_l is None:
        return torch.zeros(qh.shape, dtype=ct, device=qh.device)
    phi_q = torch.softmax(qh.to(ct), dim=-1)
    phi_k = torch.softmax(kh.to(ct), dim=-1)
    kv = phi_k.transpose(1, 2) @ vh.to(ct)
    normaliser = phi_q @ phi_k.sum(dim=1)[:, :, None] + LINEAR_EPS
    bias = None if proj_l.bias is None else proj_l.bias.detach().to(ct)
    return F.linear((phi_q @ kv) / normaliser, proj_l.weight.detach().to(ct), bias)


def sla_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l: torch.nn.Module | None,
    topk: float,
    blkq: int = SLA_BLOCKS[0],
    blkk: int = SLA_BLOCKS[1],
) -> torch.Tensor:
    """SLA (§9): block-sparse softmax branch + linear branch through proj_l. (B, L, H, D) in and out."""
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    lut, counts = block_map(qh, kh, blkq, blkk, topk)
    out = block_sparse_attention(qh, kh, vh, lut, counts, blkq, blkk) + linear_branch(qh, kh, vh, proj_l)
    return tokens_first(out, q.shape[0]).to(q.dtype)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_int8_blocks(x: torch.Tensor, blk: int):
    """Per-block INT8 of heads-first x: (integer values as float32 (N, nb, blk, D), scale float32 (N, nb)).

    scale = amax/127 + 1e-7 over the block (zero padding cannot raise amax), x̂ = round_half_away(x/scale).
    """
    xp = _pad_tokens(x.float(), blk)
    scale = xp.abs().amax(dim=(2, 3)) / 127.0 + INT8_SCALE_EPS
    return round_half_away(xp / scale[:, :, None, None]), scale


def quantize_values(vh: torch.Tensor, pv_dtype: str):
    """V as the P·V operand: (values as float32 (N, L, D), per-channel scale float32 (N, D)).

    fp8: scale = amax over tokens / 2.25 (all-zero channels get scale 1), V̂ = e4m3(V/scale), round to nearest
    even. fp16: V cast to fp16, scale 1.
    """
    v = vh.float()
    if pv_dtype == "fp16":
        return v.to(torch.float16).float(), torch.ones(v.shape[0], v.shape[2], device=v.device)
    amax = v.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / V_FP8_MAX, torch.ones_like(amax))
    return (v / scale[:, None, :]).to(torch.float8_e4m3fn).float(), scale


def fp8_column_keys(columns: int) -> torch.Tensor:
    """The key each column of the FP8 V̂ᵀ operand holds (`sage_prepass.quantise_values_fp8`): inside every
    aligned group of 16, column bits (c0, c1, c2, c3) hold key bits (c0, c2, c3, c1)."""
    column = torch.arange(columns)
    low = column % 16
    bits = [(low >> i) & 1 for i in range(4)]
    return column - low + bits[0] + (bits[2] << 1) + (bits[3] << 2) + (bits[1] << 3)


def _round_p(p: torch.Tensor, pv_dtype: str) -> torch.Tensor:
    target = torch.float8_e4m3fn if pv_dtype == "fp8" else torch.float16
    return p.to(target).float()


def sage_sparse_attention(
    qh: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    lut: torch.Tensor | None,
    counts: torch.Tensor | None,
    recipe: SageRecipe,
) -> torch.Tensor:
    """Emulated quantised sparse branch (§10), heads-first, float32 out. lut None: dense (all key blocks)."""
    n, l, d = qh.shape
    blkq, blkk = recipe.blkq, recipe.blkk
    q8, q_scale = quantize_int8_blocks(qh, blkq)
    k_smooth = kh.float() - kh.float().mean(dim=1, keepdim=True)
    k8, k_scale = quantize_int8_blocks(k_smooth, blkk)
    v8, v_scale = quantize_values(vh, recipe.pv_dtype)
    v8 = _pad_tokens(v8, blkk)
    nqb, nkb = q8.shape[1], k8.shape[1]
    offset = FP8_P_OFFSET if recipe.pv_dtype == "fp8" else 0.0
    logit_scale = q_scale * (LOG2E / math.sqrt(d))
    rows = torch.arange(n, device=qh.device)[:, None]
    m = torch.full((n, nqb, blkq), -math.inf, device=qh.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros((n, nqb, blkq, d), device=qh.device)
    steps = nkb if lut is None else lut.shape[-1]
    for i in range(steps):
        if lut is None:
            kb = torch.full((n, nqb), i, dtype=torch.long, device=qh.device)
            active = torch.ones((n, nqb), dtype=torch.bool, device=qh.device)
        else:
            kb = lut[:, :, i].long()
            active = i < counts
        s = (q8 @ k8[rows, kb].transpose(-1, -2)) * (logit_scale * k_scale[rows, kb])[..., None, None]
        key_ids = kb[..., None] * blkk + torch.arange(blkk, device=qh.device)
        keep = (key_ids < l)[:, :, None, :] & active[..., None, None]
        s = s.masked_fill(~keep, -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1))
        live = m_new > -math.inf
        alpha = torch.where(live, torch.exp2(m - m_new), torch.ones_like(m))
        p = torch.where(live[..., None], torch.exp2(s - m_new[..., None] + offset), torch.zeros_like(s))
        denom = denom * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + _round_p(p, recipe.pv_dtype) @ v8[rows, kb]
        m = m_new
    out = torch.where(denom[..., None] > 0, acc / denom.clamp_min(1e-30)[..., None], torch.zeros_like(acc))
    return out.view(n, -1, d)[:, :l] * v_scale[:, None, :]


def sagesla_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l: torch.nn.Module | None,
    topk: float,
    recipe: SageRecipe = HOPPER_RECIPE,
) -> torch.Tensor:
    """SageSLA (§10): emulated quantised sparse branch + linear branch. (B, L, H, D) in and out."""
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    lut, counts = block_map(qh, kh, recipe.blkq, recipe.blkk, topk)
    sparse = sage_sparse_attention(qh, kh, vh, lut, counts, recipe)
    out = sparse + linear_branch(qh, kh, vh, proj_l).float()
    return tokens_first(out, q.shape[0]).to(q.dtype)


def sage_dense_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, recipe: SageRecipe = HOPPER_RECIPE
) -> torch.Tensor:
    """Dense SageAttention-style emulation (all key blocks, same quantisation). (B, L, H, D) in and out."""
    out = sage_sparse_attention(heads_first(q), heads_first(k), heads_first(v), None, None, recipe)
    return tokens_first(out, q.shape[0]).to(q.dtype)
