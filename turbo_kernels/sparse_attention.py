"""Triton block-sparse attention over a LUT (SLA / SageSLA sparse branch), with a dense variant
(KERNELS.md §1.2-1.6, §4.1, §4.5).

One kernel, specialised by constexpr flags:
* QUANT: INT8 Q·Kᵀ (q8/k8 from `sage_prepass`, INT32 accumulate, one fp32 scale per block pair with
  sm_scale·log2e folded into the q scale) or bf16 Q·Kᵀ straight from the (B, L, H, D) inputs (`sla`).
* PV: 0 = bf16 P·V from the input V (`sla`), 1 = fp16 P and V (Ampere SageSLA, no E4M3 there),
  2 = E4M3 P̃·V̂ with P̃ = 2^(s - m + 8.807) in [0, 448] and V̂ transposed (N, D, L_pad), keys interleaved per
  16 as below; each block's FP8 product goes into a fresh accumulator that is added in fp32
  (`acc += tl.dot(p8, v8)`, the two-level scheme).
* DENSE: iterate over all key blocks instead of the LUT (SageAttention-style dense path).
* ACCUMULATE: add the result to what the output already holds: the q pre-pass writes the SLA linear branch
  there (computing it in this epilogue, from the bf16 q tile, cost 255 registers and spills on H100, so it was
  moved out, 2026-11-21).
* USE_DESC: load q8, k8 and V̂ through TMA tensor descriptors (Hopper; 3-D [N, L, D] / [N, D, L_pad] so that
  tiles zero-fill per head) instead of masked pointer loads.

Contract: grid (ceil(L/BLOCK_M), N); program (m, n) owns query rows [m·BLOCK_M, (m+1)·BLOCK_M) of head n and
reads LUT row m·BLOCK_M // BLKQ (BLOCK_M divides BLKQ; BLOCK_N == BLKK). Online softmax in fp32 (exp2 domain).
The key tail block masks columns >= L to -inf; the query tail is masked on load and store; every output
element is written, rows with an empty selection get 0 from the sparse branch. Offsets are int64.
Output: (B, L, H, D) in q's dtype. Accuracy vs float64 (KERNELS.md §1.9): INT8+FP8 rel-L2 <= 0.05, INT8+FP16
<= 0.04, bf16 <= 5e-3; checked by tests/test_kernels_interpret.py (TRITON_INTERPRET=1; bf16 dots run in fp32
there because the interpreter mishandles them, KERNELS.md §4.9) and by bench/attention.py on the GPU.
Reference: `sla_reference.block_sparse_attention` / `sage_sparse_attention` / `linear_branch`.
* ROW_SUM_MMA (FP8 P·V): the row sums l come from the tensor cores (P̃ times a ones column), so numerator
  and denominator use the same FP8-rounded weights.
* FP8 P·V: V̂ᵀ stores the keys of each 16 interleaved (`sage_prepass.fp8_column_key`) and P̃'s columns are
  permuted the same way (`_operand_key_order`), so the register operand is the accumulator's registers.
Per key block the loop is bound by instruction issue on Hopper: the logit scale is folded into the exponent's
multiply-add and the row max of the raw scores, the rescale of the accumulator and the add of the block's
FP8 product are one multiply-add, P̃ reaches the FP8 dot without shuffles and the row sums stay a [BLOCK_M, 16]
tile until the end (SASS, sm90: 828 -> 663 instructions per key block with ROW_SUM_MMA -> 592).
Measured (2026-11-21, Triton 3.6, bench/RESULTS.md): H100/H200 with the Hopper config (64x128, 4 warps,
2 stages, TMA) 0.93 ms at 1.3B-480p top-k 0.1 (~700 real TOPS) and 10.2 ms dense before those changes,
0.88 ms after the first two, 0.84-0.86 ms (~750-765 real TOPS) with all of them (H200, bench/attention_ab.py,
bench/attention.py); pointer loads 15-20 % slower. Not yet run on sm80/86/89/120:
those paths (fp16 P·V, pointer loads, 128x64 tiles) are only
exercised by the interpreter tests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .descriptors import TensorDescriptor, descriptors_supported
from .interpreter import interpreting
from .sage_prepass import SagePrepared, to_e4m3
from .sla_reference import LOG2E

# P·V operand formats (the kernel's PV constexpr).
PV_BF16 = tl.constexpr(0)
PV_FP16 = tl.constexpr(1)
PV_FP8 = tl.constexpr(2)


@dataclass(frozen=True)
class KernelConfig:
    """Launch of the attention kernel. `row_sum_mma` (FP8 P·V only): the softmax row sums come from the
    tensor cores, as P̃ times a ones matrix in the same FP8 (so the weights the output averages with sum to
    exactly one), instead of a 64-add reduction per row and step on the CUDA cores."""

    block_m: int
    num_warps: int
    num_stages: int
    row_sum_mma: bool = False


# Hopper: one warpgroup on a 64-row tile, 2 stages (KERNELS.md §0, §2.4: 713 TOPS dense on H100); row sums
# on the tensor cores: 1.20x / 1.04x the kernel without them at 1.3B-480p / 14B-720p, top-k 0.1 (H200,
# bench/attention_ab.py, 2026-11-21), 168 registers so that three programs share an SM.
HOPPER_CONFIG = KernelConfig(block_m=64, num_warps=4, num_stages=2, row_sum_mma=True)
# Everything else: 128-row tiles, 8 warps, 3 stages (SageAttention v1 / TurboDiffusion's SLA kernel).
GENERIC_CONFIG = KernelConfig(block_m=128, num_warps=8, num_stages=3)


@triton.jit
def _operand_key_order(p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """P̃'s columns in the order of `sage_prepass.fp8_column_key` (V̂ᵀ's key order): column bits
    (c0, c1, c2, c3) take key bits (c0, c2, c3, c1). That is the 8-bit register operand's layout read off the
    Q·Kᵀ accumulator's registers as they are, so the conversion costs no shuffles (sm90 SASS: 16 SHFL,
    16 SEL and 16 PRMT per key block fewer; any order is exact, the dot sums over the keys)."""
    x = p.reshape(BLOCK_M, BLOCK_N // 16, 2, 2, 2, 2)
    x = x.permute(0, 1, 3, 4, 2, 5)
    return x.reshape(BLOCK_M, BLOCK_N)


@triton.jit
def _sparse_attention_kernel(
    q_src,
    k_src,
    v_src,
    q_scale_ptr,
    k_scale_ptr,
    v_scale_ptr,
    lut_ptr,
    count_ptr,
    out_ptr,
    H,
    L,
    V_PAD,
    num_q_blocks,
    num_k_blocks,
    k_max,
    s_qb,
    s_qh,
    s_ql,
    s_kb,
    s_kh,
    s_kl,
    s_vb,
    s_vh,
    s_vl,
    s_ob,
    s_oh,
    s_ol,
    qk_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLKQ: tl.constexpr,
    QUANT: tl.constexpr,
    PV: tl.constexpr,
    DENSE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    USE_DESC: tl.constexpr,
    INTERPRET: tl.constexpr,
    ROW_SUM_MMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    b = (n // H).to(tl.int64)
    h = (n % H).to(tl.int64)
    row0 = pid_m * BLOCK_M
    q_block = row0 // BLKQ
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    k_base = b * s_kb + h * s_kh
    v_base = b * s_vb + h * s_vh

    if USE_DESC:
        q = q_src.load([n, row0, 0]).reshape(BLOCK_M, D)
    else:
        q = tl.load(
            q_src + b * s_qb + h * s_qh + rows[:, None].to(tl.int64) * s_ql + dims[None, :],
            mask=rows[:, None] < L,
            other=0.0,
        )
    q_scale = 1.0
    if QUANT:
        q_scale = tl.load(q_scale_ptr + n64 * num_q_blocks + q_block)
    elif INTERPRET:
        q = q.to(tl.float32)
    if PV == PV_FP8:
        offset = 8.807  # sla_reference.FP8_P_OFFSET
    else:
        offset = 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lut_row = n64 * num_q_blocks + q_block
    if DENSE:
        steps = num_k_blocks
    else:
        steps = tl.load(count_ptr + lut_row)
    if ROW_SUM_MMA:
        ones = tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, 0.0) + tl.zeros([BLOCK_N, 16], tl.float32)
        ones = to_e4m3(ones, INTERPRET)
        l_tile = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    for i in range(steps):
        if DENSE:
            kb = i
        else:
            kb = tl.load(lut_ptr + lut_row * k_max + i)
        start = kb * BLOCK_N
        keys = start + cols
        if USE_DESC:
            k = k_src.load([n, start, 0]).reshape(BLOCK_N, D)
        else:
            k = tl.load(
                k_src + k_base + keys[:, None].to(tl.int64) * s_kl + dims[None, :],
                mask=keys[:, None] < L,
                other=0.0,
            )
        # Logits in the exp2 domain are s·scale; the scale (> 0) is applied inside the exponent's
        # multiply-add, p = 2^(s·scale + (offset − m)), and to the row maximum of the raw s: one FFMA per
        # element instead of a multiply and two adds (the loop is instruction-issue-bound on Hopper).
        if QUANT:
            s = tl.dot(q, tl.trans(k)).to(tl.float32)
            scale = q_scale * tl.load(k_scale_ptr + n64 * num_k_blocks + kb)
        else:
            if INTERPRET:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k))
            scale = qk_scale
        if start + BLOCK_N > L:
            s = tl.where(keys[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale)
        p = tl.math.exp2(s * scale + (offset - m_new)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        if PV == PV_FP8:
            if USE_DESC:
                vt = v_src.load([n, 0, start]).reshape(D, BLOCK_N)
            else:
                vt = tl.load(v_src + (n64 * D + dims[:, None]) * V_PAD + keys[None, :])
            if not ROW_SUM_MMA:  # summed before the FP8 copy exists: p and p8 are never live together
                l_i = l_i * alpha + tl.sum(p, axis=1)
            p8 = to_e4m3(p, INTERPRET)
            p8 = _operand_key_order(p8, BLOCK_M, BLOCK_N)  # V̂ᵀ holds its keys in the same order
            if ROW_SUM_MMA:
                # ones: [BLOCK_N, 16] with a single column of ones, the other columns add zeros; the
                # [BLOCK_M, 16] partial sums are reduced once after the loop (no shuffles per step).
                l_tile = l_tile * alpha[:, None] + tl.dot(p8, ones)
            # Rescale and add the block's fresh FP8 product in one multiply-add.
            acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))
        else:
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            v = tl.load(
                v_src + v_base + keys[:, None].to(tl.int64) * s_vl + dims[None, :],
                mask=keys[:, None] < L,
                other=0.0,
            )
            if PV == PV_FP16:
                acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)
            elif INTERPRET:
                acc = tl.dot(p, v.to(tl.float32), acc)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    if ROW_SUM_MMA:
        l_i = tl.sum(l_tile, axis=1)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if PV == PV_FP8:
        out = out * tl.load(v_scale_ptr + n64 * D + dims)[None, :]
    out_ptrs = out_ptr + b * s_ob + h * s_oh + rows[:, None].to(tl.int64) * s_ol + dims[None, :]
    if ACCUMULATE:  # loading this tile before the key loop cost 2 ms at 14B-720p on H100 (occupancy)
        out += tl.load(out_ptrs, mask=rows[:, None] < L, other=0.0).to(tl.float32)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < L)


def default_config(device: torch.device) -> KernelConfig:
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return HOPPER_CONFIG
    return GENERIC_CONFIG


def _bhl(x: torch.Tensor, heads: int) -> tuple[int, int, int]:
    """(batch, head, token) element strides of a (B, L, H, D) tensor or of a heads-first (B·H, L, D) one."""
    if x.dim() == 4:
        return x.stride(0), x.stride(2), x.stride(1)
    return x.stride(0) * heads, x.stride(0), x.stride(1)


def _launch(
    q_src,
    k_src,
    v_src,
    *,
    q_like: torch.Tensor,
    k_like: torch.Tensor,
    v_like: torch.Tensor,
    out: torch.Tensor,
    heads: int,
    blkq: int,
    blkk: int,
    q_scale=None,
    k_scale=None,
    v_scale=None,
    lut=None,
    counts=None,
    accumulate: bool,
    quant: bool,
    pv: int,
    use_desc: bool,
    config: KernelConfig,
    v_pad: int = 0,
):
    batch, length, _, d = out.shape
    if blkq % config.block_m:
        raise ValueError(f"BLOCK_M {config.block_m} must divide the query block {blkq}")
    num_q_blocks = triton.cdiv(length, blkq)
    num_k_blocks = triton.cdiv(length, blkk)
    dense = lut is None
    placeholder = out
    _sparse_attention_kernel[(triton.cdiv(length, config.block_m), batch * heads)](
        q_src,
        k_src,
        v_src,
        placeholder if q_scale is None else q_scale,
        placeholder if k_scale is None else k_scale,
        placeholder if v_scale is None else v_scale,
        placeholder if dense else lut,
        placeholder if dense else counts,
        out,
        heads,
        length,
        v_pad,
        num_q_blocks,
        num_k_blocks,
        0 if dense else lut.shape[-1],
        *_bhl(q_like, heads),
        *_bhl(k_like, heads),
        *_bhl(v_like, heads),
        *_bhl(out, heads),
        LOG2E / math.sqrt(d),
        D=d,
        BLOCK_M=config.block_m,
        BLOCK_N=blkk,
        BLKQ=blkq,
        QUANT=quant,
        PV=pv,
        DENSE=dense,
        ACCUMULATE=accumulate,
        USE_DESC=use_desc,
        INTERPRET=interpreting(),
        ROW_SUM_MMA=config.row_sum_mma and pv == PV_FP8,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def bf16_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    counts: torch.Tensor,
    blkq: int,
    blkk: int,
    *,
    accumulate: bool = False,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sla` sparse branch: bf16/fp16 q, k, v (B, L, H, D) -> (B, L, H, D).

    Writes into `out` when given (any (B, L, H, D) tensor with a contiguous last axis), adding to its
    contents when `accumulate`.
    """
    out = torch.empty_like(q) if out is None else out
    # 128x64 w8 s3 measured fastest for the bf16 kernel on H100 too (1.67 vs 1.77 ms for 64x64 w4 s2).
    config = config or GENERIC_CONFIG
    config = dataclasses.replace(config, block_m=min(config.block_m, blkq))
    return _launch(
        q,
        k,
        v,
        q_like=q,
        k_like=k,
        v_like=v,
        out=out,
        heads=q.shape[2],
        blkq=blkq,
        blkk=blkk,
        lut=lut,
        counts=counts,
        accumulate=accumulate,
        quant=False,
        pv=PV_BF16,
        use_desc=False,
        config=config,
    )


def quantised_attention(
    prep: SagePrepared,
    v: torch.Tensor,
    out: torch.Tensor,
    blkq: int,
    blkk: int,
    *,
    lut: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    accumulate: bool = False,
    config: KernelConfig | None = None,
    use_desc: bool | None = None,
) -> torch.Tensor:
    """SageSLA sparse branch over `lut` (dense when lut is None) from pre-pass operands; writes into `out`
    (adding to its contents when `accumulate`).

    `v` is the original (B, L, H, D) V, read directly by the fp16 recipe (prep.v_fp8 is None).
    """
    heads = out.shape[2]
    config = config or default_config(out.device)
    config = dataclasses.replace(config, block_m=min(config.block_m, blkq))
    if use_desc is None:
        use_desc = descriptors_supported(out.device)
    fp8 = prep.v_fp8 is not None
    q_src, k_src = prep.q8, prep.k8
    v_src = prep.v_fp8 if fp8 else v
    if use_desc:
        d = prep.q8.shape[-1]
        q_src = TensorDescriptor.from_tensor(prep.q8, [1, config.block_m, d])
        k_src = TensorDescriptor.from_tensor(prep.k8, [1, blkk, d])
        if fp8:
            v_src = TensorDescriptor.from_tensor(prep.v_fp8, [1, d, blkk])
    return _launch(
        q_src,
        k_src,
        v_src,
        q_like=prep.q8,
        k_like=prep.k8,
        v_like=v,
        out=out,
        heads=heads,
        blkq=blkq,
        blkk=blkk,
        q_scale=prep.q_scale,
        k_scale=prep.k_scale,
        v_scale=prep.v_scale,
        lut=lut,
        counts=counts,
        accumulate=accumulate,
        quant=True,
        pv=PV_FP8 if fp8 else PV_FP16,
        use_desc=use_desc,
        config=config,
        v_pad=prep.v_fp8.shape[-1] if fp8 else 0,
    )
