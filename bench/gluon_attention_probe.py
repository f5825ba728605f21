"""Experiment (issue 5): does an explicitly pipelined Gluon kernel beat the tl-language sparse attention?

Not used by the node pack. Gluon is Triton's low-level dialect (Triton >= 3.5, API still changing); here one
warpgroup per 64 query rows, K/V tiles in a TMA ring guarded by mbarriers, and FlashAttention-3's order: the
INT8 Q·Kᵀ `wgmma` of block j and the FP8 P̃·V̂ `wgmma` of block j−1 are issued together, and the softmax of
block j runs while P̃·V̂ of block j−1 is on the tensor cores (the tl kernel waits for every `wgmma` right
after issue). Same operands, LUT and numerics as `sparse_attention.quantised_attention` (keys in V̂ᵀ's
order, row sums from the tensor cores, optionally the two-level accumulation).

State (2026-11-21, Triton 3.6 with its ptxas 12.8, compiled for sm90a on the CPU machine): 253-255
registers and ptxas reports C7514 "wgmma.mma_async instructions are serialized due to non wgmma
instructions reading accumulator registers of a wgmma between start and end of the pipeline stage" — it
then waits after every `wgmma`, so the overlap this kernel exists for is gone; waiting for Q·Kᵀ with
`num_outstanding=0` instead of 2 compiles without the warning (no overlap either). Not measured on the GPU
in this form; the first version (Q·Kᵀ of block j+1 issued before the softmax of block j, CUDA-core row
sums, natural key order) ran at 575-645 vs 731-752 real TOPS for the tl kernel (bench/RESULTS.md).

    python bench/gluon_attention_probe.py [--shapes 1.3b-480p,14b-720p]      # on a Hopper GPU

Prints rel-L2 against the shipped kernel on the same pre-pass and LUT, and both kernels' times (do_bench,
median, alternating rounds).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import triton
from _checkout import ROOT, alias_checkout_as_package
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

SHAPES = {"1.3b-480p": (12, 32760), "14b-720p": (40, 75600)}
FP8_P_OFFSET = gl.constexpr(R.FP8_P_OFFSET)
RECIPE = R.HOPPER_RECIPE  # 64-row query blocks, 128-key key blocks, FP8 P·V


@gluon.jit
def _load_tiles(k_desc, v_desc, k_ring, v_ring, ready, lut_ptr, lut_row, k_max, n, L, step, slot, D, BLOCK_N):
    """TMA of the K tile and the Vᵀ tile of LUT entry `step` into ring slot `slot`, signalled on ready[slot].
    q8/k8 are flattened to (N·L, D): a tail tile reads the next head's first keys, masked as keys >= L."""
    kb = gl.load(lut_ptr + lut_row * k_max + step)
    bar = ready.index(slot)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [n * L + kb * BLOCK_N, 0], bar, k_ring.index(slot))
    tma.async_copy_global_to_shared(v_desc, [n * D, kb * BLOCK_N], bar, v_ring.index(slot))


@gluon.jit
def _operand_key_order(p, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """P̃'s columns in V̂ᵀ's key order (the Gluon twin of `sparse_attention._operand_key_order`)."""
    x = gl.reshape(p, [BLOCK_M, BLOCK_N // 16, 2, 2, 2, 2])
    return gl.reshape(gl.permute(x, (0, 1, 3, 4, 2, 5)), [BLOCK_M, BLOCK_N])


@gluon.jit
def _issue_products(p8, v_tile, ones_smem, o_acc, l_acc, use_acc, p_sum_layout: gl.constexpr):
    """Asynchronous P̃·V̂ and P̃·ones (the row sums) of one key block, onto o_acc / l_acc when use_acc."""
    o_tok = warpgroup_mma(p8, v_tile.permute((1, 0)), o_acc, use_acc=use_acc, is_async=True)
    p8_sum = gl.convert_layout(p8, p_sum_layout)
    l_tok = warpgroup_mma(p8_sum, ones_smem.permute((1, 0)), l_acc, use_acc=use_acc, is_async=True)
    return o_tok, l_tok


@gluon.jit
def _block_softmax(s_int, m_prev, kb, scale, cols, L, BLOCK_N: gl.constexpr):
    """P̃ = 2^(s·scale − m + 8.807) of one key block (fp32), the new row max and the rescale factor."""
    scores = s_int.to(gl.float32)
    if kb * BLOCK_N + BLOCK_N > L:
        scores = gl.where(gl.expand_dims(kb * BLOCK_N + cols < L, 0), scores, float("-inf"))
    m_new = gl.maximum(m_prev, gl.max(scores, axis=1) * scale)
    p = gl.exp2(scores * scale + gl.expand_dims(FP8_P_OFFSET - m_new, 1))
    return p, m_new, gl.exp2(m_prev - m_new)


@gluon.jit
def _gluon_sparse_kernel(
    q_desc,
    k_desc,
    v_desc,
    q_scale_ptr,
    k_scale_ptr,
    v_scale_ptr,
    lut_ptr,
    count_ptr,
    out_ptr,
    H,
    L,
    num_q_blocks,
    num_k_blocks,
    k_max,
    s_ob,
    s_oh,
    s_ol,
    D: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    TWO_LEVEL: gl.constexpr,
):
    """FlashAttention-3's intra-warpgroup order: Q·Kᵀ of block j and P̃·V̂ of block j−1 are issued together,
    then the softmax of block j runs on the CUDA cores while P̃·V̂ of block j−1 runs on the tensor cores.
    TWO_LEVEL: accumulation as the tl kernel (each P̃·V̂ into a fresh accumulator, added in fp32: 64 more
    registers); otherwise the accumulator is rescaled and the tensor cores add into it (KERNELS.md §1.9:
    0.0403 vs 0.0398 rel-L2). Row sums from the tensor cores (P̃ times a ones column), a [BLOCK_M, 16] tile."""
    pid_m = gl.program_id(0)
    n = gl.program_id(1)
    qk_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    pv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 32]
    )
    sum_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 32]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=pv_layout, k_width=4)
    p_sum_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=sum_layout, k_width=4)
    row_qk: gl.constexpr = gl.SliceLayout(1, qk_layout)
    col_qk: gl.constexpr = gl.SliceLayout(0, qk_layout)
    row_pv: gl.constexpr = gl.SliceLayout(1, pv_layout)
    col_pv: gl.constexpr = gl.SliceLayout(0, pv_layout)
    row_sum: gl.constexpr = gl.SliceLayout(1, sum_layout)
    ones_layout: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
    mbarrier.init(q_bar, count=1)
    # Vᵀ-shaped ones for the row sums: row 0 of [16, BLOCK_N] is ones, the other rows add zeros.
    ones_rows = gl.arange(0, 16, layout=gl.SliceLayout(1, ones_layout))
    ones = gl.zeros([16, BLOCK_N], gl.float32, layout=ones_layout) + gl.expand_dims(
        gl.where(ones_rows == 0, 1.0, 0.0), 1
    )
    ones_smem = gl.allocate_shared_memory(
        gl.float8e4nv,
        [16, BLOCK_N],
        gl.NVMMASharedLayout.get_default_for([16, BLOCK_N], gl.float8e4nv),
        ones.to(gl.float8e4nv),
    )
    fence_async_shared()

    row0 = pid_m * BLOCK_M
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [n * L + row0, 0], q_bar, q_smem)

    lut_row = n * num_q_blocks + pid_m  # BLOCK_M is the query block of the LUT
    steps = gl.load(count_ptr + lut_row)
    for stage in gl.static_range(STAGES):
        if stage < steps:
            _load_tiles(
                k_desc, v_desc, k_ring, v_ring, ready, lut_ptr, lut_row, k_max, n, L, stage, stage, D, BLOCK_N
            )

    q_scale = gl.load(q_scale_ptr + lut_row)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=pv_layout)
    l_tile = gl.zeros([BLOCK_M, 16], gl.float32, layout=sum_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=qk_layout)
    zero_o = gl.zeros([BLOCK_M, D], gl.float32, layout=pv_layout)
    zero_l = gl.zeros([BLOCK_M, 16], gl.float32, layout=sum_layout)
    cols = gl.arange(0, BLOCK_N, layout=col_qk)

    if steps > 0:  # an empty selection leaves `out` as it is (the sparse branch adds zero)
        mbarrier.wait(q_bar, phase=0)
        mbarrier.wait(ready.index(0), phase=0)
        s_tok = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_int = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
        kb = gl.load(lut_ptr + lut_row * k_max)
        scale = q_scale * gl.load(k_scale_ptr + n * num_k_blocks + kb)
        m_init = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_qk)
        p, m_i, alpha = _block_softmax(s_int, m_init, kb, scale, cols, L, BLOCK_N)
        alpha_prev = alpha  # zeros: the empty accumulators stay empty
        p8 = gl.convert_layout(_operand_key_order(p.to(gl.float8e4nv), BLOCK_M, BLOCK_N), p_layout)
        nxt = 0
        if steps > 1:
            nxt = 1 % STAGES
            mbarrier.wait(ready.index(nxt), phase=(1 // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_ring.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        o_tok, l_tok = _issue_products(p8, v_ring.index(0), ones_smem, zero_o, zero_l, False, p_sum_layout)
        for j in range(1, steps):
            slot = j % STAGES
            s_int = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok,))  # P̃·V̂ of block j−1 still runs
            kb = gl.load(lut_ptr + lut_row * k_max + j)
            scale = q_scale * gl.load(k_scale_ptr + n * num_k_blocks + kb)
            p, m_i, alpha = _block_softmax(s_int, m_i, kb, scale, cols, L, BLOCK_N)
            o, l_part = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, l_tok))
            if TWO_LEVEL:
                acc = acc * gl.expand_dims(gl.convert_layout(alpha_prev, row_pv), 1) + o
                l_tile = l_tile * gl.expand_dims(gl.convert_layout(alpha_prev, row_sum), 1) + l_part
                alpha_prev = alpha
            else:  # rescaled to block j's maximum before its product is added on the tensor cores
                acc = o * gl.expand_dims(gl.convert_layout(alpha, row_pv), 1)
                l_tile = l_part * gl.expand_dims(gl.convert_layout(alpha, row_sum), 1)
            if j - 1 + STAGES < steps:  # block j−1's slot is free: both of its MMAs have completed
                _load_tiles(
                    k_desc,
                    v_desc,
                    k_ring,
                    v_ring,
                    ready,
                    lut_ptr,
                    lut_row,
                    k_max,
                    n,
                    L,
                    j - 1 + STAGES,
                    (j - 1) % STAGES,
                    D,
                    BLOCK_N,
                )
            p8 = gl.convert_layout(_operand_key_order(p.to(gl.float8e4nv), BLOCK_M, BLOCK_N), p_layout)
            # Issued on every iteration (after the last block, a throw-away product of a tile already in
            # place): with a conditional issue ptxas cannot tell which group `wait(2)` retires and
            # serialises every wgmma of the loop.
            nxt = slot
            if j + 1 < steps:
                nxt = (j + 1) % STAGES
                mbarrier.wait(ready.index(nxt), phase=((j + 1) // STAGES) & 1)
            # The accumulator operands of products that start from zero are tiles already dead here
            # (use_acc=False ignores their values): a zero tile kept for them would hold 64 registers.
            dead_s = p.to(gl.int32, bitcast=True)
            s_tok = warpgroup_mma(
                q_smem, k_ring.index(nxt).permute((1, 0)), dead_s, use_acc=False, is_async=True
            )
            if TWO_LEVEL:  # fresh products: the waited (dead) tiles stand in for the ignored accumulators
                o_tok, l_tok = _issue_products(
                    p8, v_ring.index(slot), ones_smem, o, l_part, False, p_sum_layout
                )
            else:
                o_tok, l_tok = _issue_products(
                    p8, v_ring.index(slot), ones_smem, acc, l_tile, True, p_sum_layout
                )
        o, l_part, _ = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, l_tok, s_tok))
        if TWO_LEVEL:
            acc = acc * gl.expand_dims(gl.convert_layout(alpha_prev, row_pv), 1) + o
            l_tile = l_tile * gl.expand_dims(gl.convert_layout(alpha_prev, row_sum), 1) + l_part
        else:
            acc = o
            l_tile = l_part

        l_pv = gl.convert_layout(gl.sum(l_tile, axis=1), row_pv)
        dims = gl.arange(0, D, layout=col_pv)
        out = acc / gl.expand_dims(gl.where(l_pv > 0, l_pv, 1.0), 1)
        out = out * gl.expand_dims(gl.load(v_scale_ptr + n * D + dims), 0)
        rows = row0 + gl.arange(0, BLOCK_M, layout=row_pv)
        b = n // H
        h = n % H
        ptrs = (
            out_ptr
            + b.to(gl.int64) * s_ob
            + h * s_oh
            + gl.expand_dims(rows.to(gl.int64) * s_ol, 1)
            + gl.expand_dims(dims, 0)
        )
        previous = gl.load(ptrs, mask=gl.expand_dims(rows < L, 1), other=0.0)
        gl.store(ptrs, (out + previous.to(gl.float32)).to(gl.bfloat16), mask=gl.expand_dims(rows < L, 1))


def gluon_sparse_attention(
    prep, out, lut, counts, stages: int = 3, two_level: bool = True, max_registers: int | None = None
):
    """Adds the sparse branch to `out` (B, L, H, D), like quantised_attention(..., accumulate=True)."""
    n, length, d = prep.q8.shape
    heads = out.shape[2]
    blkq, blkk = RECIPE.blkq, RECIPE.blkk
    q2 = prep.q8.reshape(n * length, d)
    k2 = prep.k8.reshape(n * length, d)
    v2 = prep.v_fp8.reshape(n * d, prep.v_fp8.shape[-1])
    q_desc = TensorDescriptor.from_tensor(
        q2, [blkq, d], gl.NVMMASharedLayout.get_default_for([blkq, d], gl.int8)
    )
    k_desc = TensorDescriptor.from_tensor(
        k2, [blkk, d], gl.NVMMASharedLayout.get_default_for([blkk, d], gl.int8)
    )
    v_desc = TensorDescriptor.from_tensor(
        v2, [d, blkk], gl.NVMMASharedLayout.get_default_for([d, blkk], gl.float8e4nv)
    )
    num_q_blocks = triton.cdiv(length, blkq)
    num_k_blocks = triton.cdiv(length, blkk)
    _gluon_sparse_kernel[(num_q_blocks, n)](
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
        num_k_blocks,
        lut.shape[-1],
        out.stride(0),
        out.stride(2),
        out.stride(1),
        D=d,
        BLOCK_M=blkq,
        BLOCK_N=blkk,
        STAGES=stages,
        TWO_LEVEL=two_level,
        num_warps=4,
        **({} if max_registers is None else {"maxnreg": max_registers}),
    )
    return out


def probe_shape(shape: str, topk: float) -> None:
    from attention_inputs import dit_like_qkv, random_projection
    from comfyui_turbodiffusion.turbo_kernels.block_select import select_blocks
    from comfyui_turbodiffusion.turbo_kernels.sage_prepass import sage_prepass
    from comfyui_turbodiffusion.turbo_kernels.sparse_attention import quantised_attention
    from triton.testing import do_bench

    heads, length = SHAPES[shape]
    q, k, v = dit_like_qkv(1, length, heads, 128, seed=3, device="cuda")
    proj = random_projection(128, seed=5, device="cuda")
    linear = torch.empty_like(q)
    prep = sage_prepass(q, k, v, RECIPE, proj_l=proj, linear_out=linear)
    k_sel = R.selected_block_count(prep.pooled_k.shape[1], topk)
    lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
    out_tl, out_gl = linear.clone(), linear.clone()
    quantised_attention(prep, v, out_tl, RECIPE.blkq, RECIPE.blkk, lut=lut, counts=counts, accumulate=True)
    gluon_sparse_attention(prep, out_gl, lut, counts)
    rel = ((out_gl.float() - out_tl.float()).norm() / out_tl.float().norm()).item()
    print(f"{shape}: gluon vs tl kernel rel-L2 {rel:.2e}, finite {bool(out_gl.isfinite().all())}")
    work = torch.empty_like(q)
    variants = {
        "tl kernel (shipped)": lambda: quantised_attention(
            prep, v, work, RECIPE.blkq, RECIPE.blkk, lut=lut, counts=counts, accumulate=True
        ),
        "gluon, two-level accumulation": lambda: gluon_sparse_attention(prep, work, lut, counts, 3, True),
        "gluon, tensor-core accumulation": lambda: gluon_sparse_attention(prep, work, lut, counts, 3, False),
    }
    times = {name: [] for name in variants}
    for _ in range(3):
        for name, fn in variants.items():
            times[name].append(do_bench(fn, warmup=10, rep=200, return_mode="median"))
    real = 4.0 * 128 * RECIPE.blkq * RECIPE.blkk * heads * math.ceil(length / RECIPE.blkq) * k_sel
    compiled = {}
    for caches in getattr(_gluon_sparse_kernel, "device_caches", {}).values():
        compiled.update(caches[0] if isinstance(caches, tuple) else caches)
    for kernel in compiled.values():
        regs, spills = getattr(kernel, "n_regs", "?"), getattr(kernel, "n_spills", "?")
        print(f"  compiled gluon kernel: {regs} regs, {spills} spills")
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"  {name:32s} {ms:8.3f} ms  real {real / ms / 1e9:7.1f} TOPS")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--topk", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for shape in args.shapes.split(","):
        probe_shape(shape, args.topk)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
