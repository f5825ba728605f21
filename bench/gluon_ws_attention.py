"""Experiment (issue 5): a warp-specialised Gluon version of the SageSLA sparse kernel.

Not used by the node pack. Session 7's counters (bench/NOTES_attention.md) show the tl kernel's warps stalled
on the CTA barriers Triton's pipeliner puts around its TMA ring and on the per-step LUT read that the next TMA
needs. Here one CTA owns three consecutive 64-row query blocks of a head: a one-warp producer partition reads
the LUT rows and issues the TMA loads of every consumer's K / V̂ᵀ tiles into per-consumer rings guarded by
ready / empty mbarriers, and each consumer warpgroup runs the tl kernel's loop (synchronous INT8 Q·Kᵀ,
softmax in the exp2 domain with the scale folded in, P̃ in V̂ᵀ's key order, P̃·V̂ on the tensor cores) with
no CTA barrier. Registers: 512 threads at 128 each, `setmaxnreg` gives the consumers 168 / 160 / 160 and the
producer's warpgroup 24; the inner loops do not spill.

Measured on an H200 (2026-11-21, bench/RESULTS.md session 7), 1.3B-480p, top-k 0.1, against the tl kernel in
the same run: 0.848-0.868 vs 0.846 ms (no faster), rel-L2 3.2e-3 (CUDA-core row sums, two-level accumulation)
and 1.6e-2 (one-level). WS_OVERLAP=1 (FlashAttention-3's order inside each consumer, one-level accumulation)
needs 240 registers, so WS_CONSUMERS=2: 1.202 ms (two synchronous consumers: 1.073 ms). Removing the
barriers and the LUT latency does not speed the loop up; what is left is the synchronous
Q·Kᵀ -> softmax -> P̃·V̂ chain of each warpgroup. The row sums as a ones-column product (WS_ROW_SUMS_MMA=1,
as the tl kernel does) give wrong output here (rel-L2 ~4e3; the same value as the FA3-order probe of
session 6, so probably that [16, 128] FP8 shared operand), not yet understood.

    python bench/gluon_ws_attention.py [--shapes 1.3b-480p,14b-720p] [--consumer-regs 160]   # on a Hopper GPU

Environment switches (read at import): WS_ROW_SUMS_MMA (default 0), WS_TWO_LEVEL (default 1), WS_OVERLAP
(default 0), WS_CONSUMERS (default 3; 2 with --consumer-regs 240 for WS_OVERLAP=1). Prints rel-L2
against the shipped kernel on the same pre-pass and LUT, registers, and both kernels' times (do_bench, median
of alternating rounds).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
import triton
from _checkout import ROOT, alias_checkout_as_package
from attention_ab import SHAPES  # issue 5's two shapes
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

alias_checkout_as_package()
sys.path.insert(0, str(ROOT / "tests"))

from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402

FP8_P_OFFSET = gl.constexpr(R.FP8_P_OFFSET)
RECIPE = R.HOPPER_RECIPE  # 64-row query blocks, 128-key key blocks, FP8 P·V
# Fixed here (a warp_specialize partition receives its arguments as values, not as constexprs).
D = gl.constexpr(128)
BLOCK_M = gl.constexpr(RECIPE.blkq)
BLOCK_N = gl.constexpr(RECIPE.blkk)
STAGES = gl.constexpr(2)
CONSUMERS = gl.constexpr(int(os.environ.get("WS_CONSUMERS", "3")))
# FlashAttention-3's order inside each consumer: Q·Kᵀ of block j+1 runs during the softmax of block j, P̃·V̂
# accumulated by the tensor cores into the rescaled accumulator (one level), row sums on the CUDA cores.
OVERLAP = gl.constexpr(os.environ.get("WS_OVERLAP", "0") == "1")
# Register layouts of one consumer warpgroup: the Q·Kᵀ, P̃·V̂ and row-sum accumulators and the P̃ operands.
QK_LAYOUT = gl.constexpr(
    gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
)
PV_LAYOUT = gl.constexpr(
    gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
)
SUM_LAYOUT = gl.constexpr(
    gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 32])
)
P_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=PV_LAYOUT.value, k_width=4))
P_SUM_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=SUM_LAYOUT.value, k_width=4))
ROW_QK = gl.constexpr(gl.SliceLayout(1, QK_LAYOUT.value))
COL_QK = gl.constexpr(gl.SliceLayout(0, QK_LAYOUT.value))
ROW_PV = gl.constexpr(gl.SliceLayout(1, PV_LAYOUT.value))
ROW_SUM = gl.constexpr(gl.SliceLayout(1, SUM_LAYOUT.value))
# Experiment switches (environment, read at import): row sums on the CUDA cores from the fp32 P̃ instead of a
# ones-column product, and P̃·V̂ accumulated by the tensor cores into the rescaled accumulator (one level).
ROW_SUMS_MMA = gl.constexpr(os.environ.get("WS_ROW_SUMS_MMA", "0") == "1")
TWO_LEVEL = gl.constexpr(os.environ.get("WS_TWO_LEVEL", "1") == "1")


@gluon.jit
def _producer(
    q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, ready, empty, lut_ptr, count_ptr,
    n, first_block, num_q_blocks, k_max, L,
):  # fmt: skip
    """Q tiles, then K / V̂ᵀ tiles round-robin over the consumers, each ring slot reused once its consumer
    released it (empty[slot] completes once per use; the first pass over a ring waits for nothing)."""
    most = 0
    for c in gl.static_range(CONSUMERS):
        block = first_block + c
        if block < num_q_blocks:
            mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [n * L + block * 64, 0], q_bar.index(c), q_smem.index(c))
            most = gl.maximum(most, gl.load(count_ptr + n * num_q_blocks + block))
    tile_bytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    for i in range(most):
        for c in gl.static_range(CONSUMERS):
            block = first_block + c
            row = n * num_q_blocks + block
            live = block < num_q_blocks
            if live:
                live = i < gl.load(count_ptr + row)
            if live:
                slot = c * STAGES + i % STAGES
                mbarrier.wait(empty.index(slot), phase=((i // STAGES) & 1) ^ 1)
                kb = gl.load(lut_ptr + row * k_max + i)
                bar = ready.index(slot)
                mbarrier.expect(bar, tile_bytes)
                tma.async_copy_global_to_shared(k_desc, [n * L + kb * BLOCK_N, 0], bar, k_ring.index(slot))
                tma.async_copy_global_to_shared(v_desc, [n * D, kb * BLOCK_N], bar, v_ring.index(slot))


@gluon.jit
def _operand_key_order(p, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """P̃'s columns in V̂ᵀ's key order (`sage_prepass.fp8_column_key`): column bits (c0, c1, c2, c3) take key
    bits (c0, c2, c3, c1), the FP8 register operand's layout read off the Q·Kᵀ accumulator."""
    x = gl.reshape(p, [BLOCK_M, BLOCK_N // 16, 2, 2, 2, 2])
    return gl.reshape(gl.permute(x, (0, 1, 3, 4, 2, 5)), [BLOCK_M, BLOCK_N])


@gluon.jit
def _add_block(acc, l_pv, v_scale_ptr, out_ptr, n, block, H, L, s_ob, s_oh, s_ol):
    """out[block rows] += acc / l · s_v (bf16), rows >= L masked."""
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, PV_LAYOUT))
    out = acc / gl.expand_dims(gl.where(l_pv > 0, l_pv, 1.0), 1)
    out = out * gl.expand_dims(gl.load(v_scale_ptr + n * D + dims), 0)
    rows = block * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, PV_LAYOUT))
    ptrs = (
        out_ptr
        + (n // H).to(gl.int64) * s_ob
        + (n % H) * s_oh
        + gl.expand_dims(rows.to(gl.int64) * s_ol, 1)
        + gl.expand_dims(dims, 0)
    )
    valid = gl.expand_dims(rows < L, 1)
    previous = gl.load(ptrs, mask=valid, other=0.0)
    gl.store(ptrs, (out + previous.to(gl.float32)).to(gl.bfloat16), mask=valid)


@gluon.jit
def _block_softmax(s_int, m_prev, kb, scale, cols, L):
    """P̃ = 2^(s·scale − m + 8.807) of one key block (fp32; keys >= L masked), the new row max, the rescale."""
    s = s_int.to(gl.float32)
    if kb * BLOCK_N + BLOCK_N > L:
        s = gl.where(gl.expand_dims(kb * BLOCK_N + cols < L, 0), s, float("-inf"))
    m_new = gl.maximum(m_prev, gl.max(s, axis=1) * scale)
    p = gl.exp2(s * scale + gl.expand_dims(FP8_P_OFFSET - m_new, 1))
    return p, m_new, gl.exp2(m_prev - m_new)


@gluon.jit
def _consumer_overlapped(
    c, q_smem, k_ring, v_ring, q_bar, ready, empty, ones_smem, q_scale_ptr, k_scale_ptr, v_scale_ptr,
    lut_ptr, count_ptr, out_ptr, n, first_block, H, L, num_q_blocks, num_k_blocks, k_max, s_ob, s_oh, s_ol,
):  # fmt: skip
    """One 64-row query block in FlashAttention-3's order: Q·Kᵀ of block j+1 is issued before the softmax of
    block j and waited after it (after the last block it is issued on the current tile and thrown away, so
    that every wait retires a known group)."""

    block = first_block + c
    if block < num_q_blocks:
        lut_row = n * num_q_blocks + block
        steps = gl.load(count_ptr + lut_row)
        q_scale = gl.load(q_scale_ptr + lut_row)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, QK_LAYOUT))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=ROW_QK)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_QK)
        acc = gl.zeros([BLOCK_M, D], gl.float32, layout=PV_LAYOUT)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=QK_LAYOUT)
        mbarrier.wait(q_bar.index(c), phase=0)
        q_tile = q_smem.index(c)
        if steps > 0:
            mbarrier.wait(ready.index(c * STAGES), phase=0)
            s_tok = warpgroup_mma(
                q_tile, k_ring.index(c * STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True
            )
            s_int = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
            for j in range(steps):
                slot = c * STAGES + j % STAGES
                following = slot
                if j + 1 < steps:
                    following = c * STAGES + (j + 1) % STAGES
                    mbarrier.wait(ready.index(following), phase=((j + 1) // STAGES) & 1)
                s_tok = warpgroup_mma(
                    q_tile, k_ring.index(following).permute((1, 0)), zero_s, use_acc=False, is_async=True
                )
                kb = gl.load(lut_ptr + lut_row * k_max + j)
                scale = q_scale * gl.load(k_scale_ptr + n * num_k_blocks + kb)
                p, m_i, alpha = _block_softmax(s_int, m_i, kb, scale, cols, L)
                l_i = l_i * alpha + gl.sum(p, axis=1)
                p8 = gl.convert_layout(_operand_key_order(p.to(gl.float8e4nv), BLOCK_M, BLOCK_N), P_LAYOUT)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_PV), 1)
                o_tok = warpgroup_mma(
                    p8, v_ring.index(slot).permute((1, 0)), acc, use_acc=True, is_async=True
                )
                s_int = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))  # P̃·V̂ of block j may still run
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
                mbarrier.arrive(empty.index(slot))
        l_pv = gl.convert_layout(l_i, ROW_PV)
        _add_block(acc, l_pv, v_scale_ptr, out_ptr, n, block, H, L, s_ob, s_oh, s_ol)


@gluon.jit
def _consumer(
    c, q_smem, k_ring, v_ring, q_bar, ready, empty, ones_smem, q_scale_ptr, k_scale_ptr, v_scale_ptr,
    lut_ptr, count_ptr, out_ptr, n, first_block, H, L, num_q_blocks, num_k_blocks, k_max, s_ob, s_oh, s_ol,
):  # fmt: skip
    """One 64-row query block: the tl kernel's loop, reading its tiles from the producer's ring."""

    block = first_block + c
    if block < num_q_blocks:
        lut_row = n * num_q_blocks + block
        steps = gl.load(count_ptr + lut_row)
        q_scale = gl.load(q_scale_ptr + lut_row)
        cols = gl.arange(0, BLOCK_N, layout=COL_QK)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=ROW_QK)
        acc = gl.zeros([BLOCK_M, D], gl.float32, layout=PV_LAYOUT)
        l_tile = gl.zeros([BLOCK_M, 16], gl.float32, layout=SUM_LAYOUT)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_QK)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=QK_LAYOUT)
        mbarrier.wait(q_bar.index(c), phase=0)
        q_tile = q_smem.index(c)
        for i in range(steps):
            slot = c * STAGES + i % STAGES
            kb = gl.load(lut_ptr + lut_row * k_max + i)
            scale = q_scale * gl.load(k_scale_ptr + n * num_k_blocks + kb)
            mbarrier.wait(ready.index(slot), phase=(i // STAGES) & 1)
            s_tok = warpgroup_mma(
                q_tile, k_ring.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True
            )
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,)).to(gl.float32)
            if kb * BLOCK_N + BLOCK_N > L:
                s = gl.where(gl.expand_dims(kb * BLOCK_N + cols < L, 0), s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale)
            p = gl.exp2(s * scale + gl.expand_dims(FP8_P_OFFSET - m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            m_i = m_new
            p8 = _operand_key_order(p.to(gl.float8e4nv), BLOCK_M, BLOCK_N)
            alpha_pv = gl.expand_dims(gl.convert_layout(alpha, ROW_PV), 1)
            if not ROW_SUMS_MMA:
                l_i = l_i * alpha + gl.sum(p, axis=1)
            if TWO_LEVEL:
                o_tok = warpgroup_mma(
                    gl.convert_layout(p8, P_LAYOUT),
                    v_ring.index(slot).permute((1, 0)),
                    gl.zeros([BLOCK_M, D], gl.float32, layout=PV_LAYOUT),
                    use_acc=False,
                    is_async=True,
                )
            else:
                o_tok = warpgroup_mma(
                    gl.convert_layout(p8, P_LAYOUT),
                    v_ring.index(slot).permute((1, 0)),
                    acc * alpha_pv,
                    use_acc=True,
                    is_async=True,
                )
            if ROW_SUMS_MMA:
                l_tok = warpgroup_mma(
                    gl.convert_layout(p8, P_SUM_LAYOUT),
                    ones_smem.permute((1, 0)),
                    gl.zeros([BLOCK_M, 16], gl.float32, layout=SUM_LAYOUT),
                    use_acc=False,
                    is_async=True,
                )
                o, l_part = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, l_tok))
                l_tile = l_tile * gl.expand_dims(gl.convert_layout(alpha, ROW_SUM), 1) + l_part
            else:
                o = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
            mbarrier.arrive(empty.index(slot))  # the products have read the slot
            if TWO_LEVEL:
                acc = acc * alpha_pv + o
            else:
                acc = o

        if ROW_SUMS_MMA:
            l_pv = gl.convert_layout(gl.sum(l_tile, axis=1), ROW_PV)
        else:
            l_pv = gl.convert_layout(l_i, ROW_PV)
        _add_block(acc, l_pv, v_scale_ptr, out_ptr, n, block, H, L, s_ob, s_oh, s_ol)


CONSUMER = _consumer_overlapped if OVERLAP else _consumer


@gluon.jit
def _ws_sparse_kernel(
    q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, lut_ptr, count_ptr, out_ptr,
    H, L, num_q_blocks, num_k_blocks, k_max, s_ob, s_oh, s_ol,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):  # fmt: skip
    n = gl.program_id(1)
    first_block = gl.program_id(0) * CONSUMERS
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(
        k_desc.dtype, [CONSUMERS * STAGES] + k_desc.block_type.shape, k_desc.layout
    )
    v_ring = gl.allocate_shared_memory(
        v_desc.dtype, [CONSUMERS * STAGES] + v_desc.block_type.shape, v_desc.layout
    )
    ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS * STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [CONSUMERS * STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    for slot in gl.static_range(CONSUMERS * STAGES):
        mbarrier.init(ready.index(slot), count=1)
        mbarrier.init(empty.index(slot), count=1)
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(q_bar.index(c), count=1)
    # Vᵀ-shaped ones for the row sums: row 0 of [16, BLOCK_N] is ones, the other rows add zeros.
    ones_layout: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
    ones_rows = gl.arange(0, 16, layout=gl.SliceLayout(1, ones_layout))
    ones = gl.zeros([16, BLOCK_N], gl.float32, layout=ones_layout) + gl.expand_dims(
        gl.where(ones_rows == 0, 1.0, 0.0), 1
    )
    ones_smem = gl.allocate_shared_memory(
        gl.float8e4nv, [16, BLOCK_N], gl.NVMMASharedLayout.get_default_for([16, BLOCK_N], gl.float8e4nv),
        ones.to(gl.float8e4nv),
    )  # fmt: skip
    fence_async_shared()

    common = (q_smem, k_ring, v_ring, q_bar, ready, empty, ones_smem, q_scale_ptr, k_scale_ptr,
              v_scale_ptr, lut_ptr, count_ptr, out_ptr, n, first_block, H, L, num_q_blocks, num_k_blocks,
              k_max, s_ob, s_oh, s_ol)  # fmt: skip
    producer = (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, ready, empty, lut_ptr, count_ptr, n,
                first_block, num_q_blocks, k_max, L)  # fmt: skip
    if CONSUMERS == 3:
        gl.warp_specialize(
            [
                (CONSUMER, (0,) + common),
                (CONSUMER, (1,) + common),
                (CONSUMER, (2,) + common),
                (_producer, producer),
            ],
            [4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
        )
    else:
        gl.warp_specialize(
            [(CONSUMER, (0,) + common), (CONSUMER, (1,) + common), (_producer, producer)],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )


def ws_sparse_attention(prep, out, lut, counts, consumer_regs: int = 160, producer_regs: int = 24):
    """Adds the sparse branch to `out` (B, L, H, D), like quantised_attention(..., accumulate=True)."""
    n, length, d = prep.q8.shape
    heads = out.shape[2]
    blkq, blkk = RECIPE.blkq, RECIPE.blkk
    q_desc = TensorDescriptor.from_tensor(
        prep.q8.reshape(n * length, d), [blkq, d], gl.NVMMASharedLayout.get_default_for([blkq, d], gl.int8)
    )
    k_desc = TensorDescriptor.from_tensor(
        prep.k8.reshape(n * length, d), [blkk, d], gl.NVMMASharedLayout.get_default_for([blkk, d], gl.int8)
    )
    v_desc = TensorDescriptor.from_tensor(
        prep.v_fp8.reshape(n * d, prep.v_fp8.shape[-1]),
        [d, blkk],
        gl.NVMMASharedLayout.get_default_for([d, blkk], gl.float8e4nv),
    )
    num_q_blocks = triton.cdiv(length, blkq)
    _ws_sparse_kernel[(triton.cdiv(num_q_blocks, CONSUMERS), n)](
        q_desc,
        k_desc,
        v_desc,
        prep.q_scale,
        prep.k_scale,
        prep.v_scale,
        lut,
        counts,
        out,
        heads,
        length,
        num_q_blocks,
        triton.cdiv(length, blkk),
        lut.shape[-1],
        out.stride(0),
        out.stride(2),
        out.stride(1),
        CONSUMER_REGS=consumer_regs,
        PRODUCER_REGS=producer_regs,
        num_warps=4,
    )
    return out


def probe_shape(shape: str, topk: float, consumer_regs: int) -> None:
    from attention_inputs import dit_like_qkv, random_projection
    from comfyui_turbodiffusion.turbo_kernels.block_select import select_blocks
    from comfyui_turbodiffusion.turbo_kernels.sage_prepass import sage_prepass
    from comfyui_turbodiffusion.turbo_kernels.sparse_attention import quantised_attention
    from triton.testing import do_bench

    heads, length = SHAPES[shape]
    q, k, v = dit_like_qkv(1, length, heads, 128, seed=3, device="cuda")
    linear = torch.empty_like(q)
    prep = sage_prepass(
        q, k, v, RECIPE, proj_l=random_projection(128, seed=5, device="cuda"), linear_out=linear
    )
    k_sel = R.selected_block_count(prep.pooled_k.shape[1], topk)
    lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
    out_tl, out_ws = linear.clone(), linear.clone()
    quantised_attention(prep, v, out_tl, RECIPE.blkq, RECIPE.blkk, lut=lut, counts=counts, accumulate=True)
    ws_sparse_attention(prep, out_ws, lut, counts, consumer_regs)
    torch.cuda.synchronize()
    rel = ((out_ws.float() - out_tl.float()).norm() / out_tl.float().norm()).item()
    print(f"{shape}: warp-specialised vs tl kernel rel-L2 {rel:.2e}, finite {bool(out_ws.isfinite().all())}")
    work = linear.clone()
    variants = {
        "tl kernel (shipped)": lambda: quantised_attention(
            prep, v, work, RECIPE.blkq, RECIPE.blkk, lut=lut, counts=counts, accumulate=True
        ),
        f"gluon, {CONSUMERS} consumers, {STAGES} stages": lambda: ws_sparse_attention(
            prep, work, lut, counts, consumer_regs
        ),
    }
    times = {name: [] for name in variants}
    for _ in range(3):
        for name, fn in variants.items():
            times[name].append(do_bench(fn, warmup=10, rep=200, return_mode="median"))
    real = 4.0 * 128 * RECIPE.blkq * RECIPE.blkk * heads * math.ceil(length / RECIPE.blkq) * k_sel
    for caches in getattr(_ws_sparse_kernel, "device_caches", {}).values():
        for kernel in (caches[0] if isinstance(caches, tuple) else caches).values():
            regs, spills = getattr(kernel, "n_regs", "?"), getattr(kernel, "n_spills", "?")
            print(f"  compiled gluon kernel: {regs} regs, {spills} spills, {kernel.metadata.shared} B shared")
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"  {name:32s} {ms:8.3f} ms  real {real / ms / 1e9:7.1f} TOPS")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--consumer-regs", type=int, default=160)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for shape in args.shapes.split(","):
        probe_shape(shape, args.topk, args.consumer_regs)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
