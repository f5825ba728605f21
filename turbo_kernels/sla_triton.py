"""Complete SLA / SageSLA / dense-Sage attention ops built from the Triton kernel families.

`sla_attention_triton`: block selection + bf16 block-sparse attention + fused linear branch
(TURBODIFFUSION.md §9).
`sagesla_attention_triton`: fused pre-pass (INT8 Q/K, FP8 or fp16 V, pooling, linear-branch state) + selection
+ quantised block-sparse attention with the fused linear branch (§10). `sage_dense_attention_triton`: the same
quantisation over all key blocks. All take q, k, v in (B, L, H, D) on a CUDA device (or under
TRITON_INTERPRET=1) and return (B, L, H, D) in q's dtype; inputs that are not bf16/fp16 are computed in bf16.
Their PyTorch references are `sla_reference.sla_attention_reference`, `sagesla_attention_reference` and
`sage_dense_attention_reference`.
"""

from __future__ import annotations

import torch

from .block_select import select_blocks
from .sage_prepass import kv_stats, pool_and_quantise, sage_prepass
from .sla_reference import HOPPER_RECIPE, SLA_BLOCKS, SageRecipe, selected_block_count
from .sparse_attention import KernelConfig, LinearEpilogue, bf16_sparse_attention, quantised_attention


def _half(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)


def fold_projection(
    q: torch.Tensor, kv: torch.Tensor, z: torch.Tensor, proj_l: torch.nn.Module
) -> LinearEpilogue:
    """proj_l folded into the linear-branch state: KV' = KV·Wᵀ (bf16), so the epilogue needs one small dot."""
    weight = proj_l.weight.detach().to(device=kv.device, dtype=torch.float32)
    bias = None if proj_l.bias is None else proj_l.bias.detach()
    bias = (
        torch.zeros(weight.shape[0], device=kv.device) if bias is None else bias.to(kv.device, torch.float32)
    )
    return LinearEpilogue(q=q, kv=(kv @ weight.T).to(torch.bfloat16), z=z, bias=bias.contiguous())


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
    """SLA with bf16 block-sparse attention; proj_l None skips the linear branch."""
    dtype = q.dtype
    q, k, v = _half(q), _half(k), _half(v)
    stats = kv_stats(k, v, need_vmax=False, linear=proj_l is not None)
    pooled_q, _, _ = pool_and_quantise(q, blkq)
    pooled_k, _, _ = pool_and_quantise(k, blkk, mean=stats.k_mean)
    lut, counts = select_blocks(pooled_q, pooled_k, selected_block_count(pooled_k.shape[1], topk))
    linear = None if proj_l is None else fold_projection(q, stats.kv, stats.z, proj_l)
    out = bf16_sparse_attention(q, k, v, lut, counts, blkq, blkk, linear=linear, config=config)
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
    """SageSLA: quantised block-sparse attention + linear branch; proj_l None skips the linear branch."""
    dtype = q.dtype
    q, k, v = _half(q), _half(k), _half(v)
    prep = sage_prepass(q, k, v, recipe, linear=proj_l is not None)
    lut, counts = select_blocks(
        prep.pooled_q, prep.pooled_k, selected_block_count(prep.pooled_k.shape[1], topk)
    )
    linear = None if proj_l is None else fold_projection(q, prep.stats.kv, prep.stats.z, proj_l)
    out = quantised_attention(
        prep,
        v,
        torch.empty_like(q),
        recipe.blkq,
        recipe.blkk,
        lut=lut,
        counts=counts,
        linear=linear,
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
    prep = sage_prepass(q, k, v, recipe, linear=False)
    out = quantised_attention(
        prep, v, torch.empty_like(q), recipe.blkq, recipe.blkk, config=config, use_desc=use_desc
    )
    return out.to(dtype)
