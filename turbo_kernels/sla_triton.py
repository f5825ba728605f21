"""Complete SLA / SageSLA / dense-Sage attention ops built from the Triton kernel families.

`sla_attention_triton`: statistics + pooling (with the linear branch written by the query pass) + block
selection + bf16 block-sparse attention accumulated on top (TURBODIFFUSION.md §9).
`sagesla_attention_triton`: the same with the quantising pre-pass (INT8 Q/K, FP8 or fp16 V) and the quantised
block-sparse attention (§10). `sage_dense_attention_triton`: the same quantisation over all key blocks.
All take q, k, v in (B, L, H, D) on a CUDA device (or under TRITON_INTERPRET=1) and return (B, L, H, D) in q's
dtype; inputs that are not bf16/fp16 are computed in bf16. proj_l None skips the linear branch.
PyTorch references: `sla_reference.sla_attention_reference`, `sagesla_attention_reference`,
`sage_dense_attention_reference`.
"""

from __future__ import annotations

import torch

from .block_select import select_blocks
from .sage_prepass import pool_and_quantise, sage_prepass, sequence_stats
from .sla_reference import HOPPER_RECIPE, SLA_BLOCKS, SageRecipe, selected_block_count
from .sparse_attention import KernelConfig, bf16_sparse_attention, quantised_attention


def _half(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 with a contiguous head dimension, as the kernels read it."""
    x = x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)
    return x if x.stride(-1) == 1 else x.contiguous()


def sla_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l: torch.nn.Module | None,
    topk: float,
    blkq: int = SLA_BLOCKS[0],
    blkk: int = SLA_BLOCKS[1],
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """SLA with bf16 block-sparse attention."""
    dtype = q.dtype
    q, k, v = _half(q), _half(k), _half(v)
    out = torch.empty_like(q)
    stats = sequence_stats(k, v, fp8_values=False, proj_l=proj_l)
    pooled_q, _, _ = pool_and_quantise(q, blkq, linear=stats.linear, linear_out=out)
    pooled_k, _, _ = pool_and_quantise(k, blkk, mean=stats.k_mean)
    lut, counts = select_blocks(pooled_q, pooled_k, selected_block_count(pooled_k.shape[1], topk))
    bf16_sparse_attention(
        q, k, v, lut, counts, blkq, blkk, accumulate=proj_l is not None, config=config, out=out
    )
    return out.to(dtype)


def sagesla_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l: torch.nn.Module | None,
    topk: float,
    recipe: SageRecipe = HOPPER_RECIPE,
    config: KernelConfig | None = None,
    use_desc: bool | None = None,
) -> torch.Tensor:
    """SageSLA: quantised block-sparse attention + linear branch."""
    dtype = q.dtype
    q, k, v = _half(q), _half(k), _half(v)
    out = torch.empty_like(q)
    prep = sage_prepass(q, k, v, recipe, proj_l=proj_l, linear_out=out)
    k_sel = selected_block_count(prep.pooled_k.shape[1], topk)
    lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
    quantised_attention(
        prep,
        v,
        out,
        recipe.blkq,
        recipe.blkk,
        lut=lut,
        counts=counts,
        accumulate=proj_l is not None,
        config=config,
        use_desc=use_desc,
    )
    return out.to(dtype)


def sage_dense_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    recipe: SageRecipe = HOPPER_RECIPE,
    config: KernelConfig | None = None,
    use_desc: bool | None = None,
) -> torch.Tensor:
    """Dense SageAttention-style attention (INT8 Q·Kᵀ, FP8/fp16 P·V) with the SageSLA quantisation."""
    dtype = q.dtype
    q, k, v = _half(q), _half(k), _half(v)
    prep = sage_prepass(q, k, v, recipe)
    out = quantised_attention(
        prep, v, torch.empty_like(q), recipe.blkq, recipe.blkk, config=config, use_desc=use_desc
    )
    return out.to(dtype)
