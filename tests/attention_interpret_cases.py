"""Runs the SLA / SageSLA Triton kernels under TRITON_INTERPRET=1 at tiny sizes and prints one JSON object of
measurements, judged by tests/test_kernels_interpret.py.

A separate process because Triton decides at decoration time whether a kernel is interpreted: the variable
must be set before the kernel modules are imported, which a shared pytest process cannot guarantee.
Every reference here is independent of the kernels: float64 formulas (attention_formulas) and the PyTorch
reference module. Outputs are pre-filled with NaN to prove every element is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attention_formulas as F  # noqa: E402
import torch  # noqa: E402
from attention_inputs import dit_like_qkv, random_projection, random_qkv  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.block_select import select_blocks  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sage_prepass import sage_prepass, sequence_stats  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sla_triton import (  # noqa: E402
    sage_dense_attention_triton,
    sagesla_attention_triton,
    sla_attention_triton,
)
from comfyui_turbodiffusion.turbo_kernels.sparse_attention import (  # noqa: E402
    GENERIC_CONFIG,
    bf16_sparse_attention,
    quantised_attention,
)

# Small block geometries keep the interpreter fast; the kernels are generic in the block sizes.
HOPPER_LIKE = R.SageRecipe(32, 64, "fp8")
AMPERE_LIKE = R.SageRecipe(64, 32, "fp16")
D = 32


def unwritten(x: torch.Tensor) -> int:
    return int((~x.isfinite()).sum())


def prepass_cases(out: dict) -> None:
    q, k, v = random_qkv(1, 300, 2, D, seed=1)
    prep = sage_prepass(q, k, v, HOPPER_LIKE)
    qh, kh, vh = (R.heads_first(x) for x in (q, k, v))
    q8, q_scale = R.quantize_int8_blocks(qh, HOPPER_LIKE.blkq)
    k8, k_scale = R.quantize_int8_blocks(kh.float() - kh.float().mean(dim=1, keepdim=True), HOPPER_LIKE.blkk)
    v8, v_scale = R.quantize_values(vh, "fp8")
    sm = R.LOG2E / math.sqrt(D)
    v_by_key = torch.empty_like(prep.v_fp8.float())
    v_by_key[:, :, R.fp8_column_keys(v_by_key.shape[-1])] = prep.v_fp8.float()
    out["prepass"] = {
        "q8_mismatch": int((prep.q8.float() != q8.reshape(2, -1, D)[:, :300]).sum()),
        "k8_mismatch": int((prep.k8.float() != k8.reshape(2, -1, D)[:, :300]).sum()),
        "q_scale_err": float((prep.q_scale / sm - q_scale).abs().max() / q_scale.max()),
        "k_scale_err": float((prep.k_scale - k_scale).abs().max() / k_scale.max()),
        "v8_mismatch": int((v_by_key[:, :, :300].transpose(1, 2) != v8).sum()),
        "v_pad_nonzero": int((v_by_key[:, :, 300:] != 0).sum()),
        "v_columns_in_key_order": bool((prep.v_fp8.float()[:, :, :300].transpose(1, 2) == v8).all()),
        "v_scale_err": float((prep.v_scale - v_scale).abs().max()),
        "pooled_err": float(
            max(
                (prep.pooled_q - R.block_means(qh.float(), HOPPER_LIKE.blkq)).abs().max(),
                (prep.pooled_k - R.pooled_queries_keys(qh, kh, 32, 64)[1]).abs().max(),
            )
        ),
    }
    proj = random_projection(D, seed=2)
    stats = sequence_stats(k, v, fp8_values=True, proj_l=proj)
    phi_k = torch.softmax(kh.double(), dim=-1)
    kv = phi_k.transpose(1, 2) @ vh.double()
    out["linear_state"] = {
        "k_mean_err": float((stats.k_mean.double() - kh.double().mean(dim=1)).abs().max()),
        "z_rel": F.rel_l2(stats.linear.z, phi_k.sum(dim=1)),
        "kv_proj_rel": F.rel_l2(stats.linear.kv, kv @ proj.weight.detach().double().T),
    }


def selection_cases(out: dict) -> None:
    results = {}
    for kind, make in (("random", random_qkv), ("dit", dit_like_qkv)):
        q, k, v = make(1, 1000, 2, D, seed=3)
        for blkq, blkk in ((32, 64), (64, 32)):
            prep = sage_prepass(q, k, v, R.SageRecipe(blkq, blkk, "fp8"))
            k_sel = R.selected_block_count(prep.pooled_k.shape[1], 0.2)
            lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
            results[f"{kind}/{blkq}x{blkk}"] = {
                "mismatches": F.selection_mismatches(lut, F.block_scores(q, k, blkq, blkk)),
                "ascending": bool((lut[..., 1:] > lut[..., :-1]).all()),
                "counts_ok": bool((counts == k_sel).all()),
                "k_sel": k_sel,
            }
    scores_q = torch.randn(1, 3, D)
    tied_k = torch.randn(1, 1, D).repeat(1, 12, 1)  # all scores of a row tie
    lut, _ = select_blocks(scores_q, tied_k, 5)
    results["ties_keep_lowest_ids"] = bool((lut == torch.arange(5, dtype=torch.int32)).all())
    out["selection"] = results


def attention_cases(out: dict) -> None:
    results = {}
    proj = random_projection(D, seed=4)
    for kind, make in (("random", random_qkv), ("dit", dit_like_qkv)):
        q, k, v = make(1, 600, 2, D, seed=5)
        for recipe in (HOPPER_LIKE, AMPERE_LIKE):
            name = f"{kind}/sagesla-{recipe.pv_dtype}"
            prep = sage_prepass(q, k, v, recipe)
            k_sel = R.selected_block_count(prep.pooled_k.shape[1], 0.3)
            lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
            sparse = torch.full_like(q, float("nan"))
            quantised_attention(
                prep, v, sparse, recipe.blkq, recipe.blkk, lut=lut, counts=counts, use_desc=False
            )
            described = torch.full_like(q, float("nan"))
            quantised_attention(
                prep, v, described, recipe.blkq, recipe.blkk, lut=lut, counts=counts, use_desc=True
            )
            mask = F.mask_from_lut(lut, 1, math.ceil(600 / recipe.blkk))
            exact = F.masked_attention(q, k, v, mask, recipe.blkq, recipe.blkk)
            qh, kh, vh = (R.heads_first(x) for x in (q, k, v))
            emulated = R.tokens_first(R.sage_sparse_attention(qh, kh, vh, lut, counts, recipe), 1)
            full = sagesla_attention_triton(q, k, v, proj, 0.3, recipe)
            linear = F.linear_branch(q, k, v, proj.weight, proj.bias)
            row_sums = torch.full_like(q, float("nan"))
            quantised_attention(
                prep,
                v,
                row_sums,
                recipe.blkq,
                recipe.blkk,
                lut=lut,
                counts=counts,
                use_desc=False,
                config=dataclasses.replace(GENERIC_CONFIG, row_sum_mma=True),
            )
            results[name] = {
                "row_sum_mma_unwritten": unwritten(row_sums),
                "row_sum_mma_rel_l2": F.rel_l2(row_sums, exact),
                "row_sum_mma_rel_l2_vs_emulation": F.rel_l2(row_sums, emulated),
                "unwritten": unwritten(sparse),
                "rel_l2": F.rel_l2(sparse, exact),
                "cos": F.cosine(sparse, exact),
                "rel_l2_vs_emulation": F.rel_l2(sparse, emulated),
                "descriptor_equals_pointer": bool(torch.equal(sparse, described)),
                "full_rel_l2": F.rel_l2(full, exact + linear),
            }
        mask = F.block_mask(q, k, 64, 32, 0.3)
        sparse = torch.full_like(q, float("nan"))
        prep_q = R.heads_first(q)
        lut, counts = R.block_map(prep_q, R.heads_first(k), 64, 32, 0.3)
        bf16_sparse_attention(q, k, v, lut, counts, 64, 32, out=sparse)
        full = sla_attention_triton(q, k, v, proj, 0.3, 64, 32)
        exact = F.masked_attention(q, k, v, mask, 64, 32)
        results[f"{kind}/sla"] = {
            "unwritten": unwritten(sparse),
            "rel_l2": F.rel_l2(sparse, F.masked_attention(q, k, v, F.mask_from_lut(lut, 1, 19), 64, 32)),
            "full_rel_l2": F.rel_l2(full, exact + F.linear_branch(q, k, v, proj.weight, proj.bias)),
        }
        dense = sage_dense_attention_triton(q, k, v, HOPPER_LIKE)
        results[f"{kind}/dense"] = {
            "rel_l2": F.rel_l2(dense, F.masked_attention(q, k, v, None, 1, 1)),
            "unwritten": unwritten(dense),
        }
    out["attention"] = results


def ragged_cases(out: dict) -> None:
    results = {}
    proj = random_projection(D, seed=6)
    for length in (67, 129):
        q, k, v = random_qkv(1, length, 2, D, seed=length)
        linear = F.linear_branch(q, k, v, proj.weight, proj.bias)
        for topk in (0.0, 0.5):
            lut, _ = R.block_map(R.heads_first(q), R.heads_first(k), 32, 64, topk)
            exact = F.masked_attention(q, k, v, F.mask_from_lut(lut, 1, math.ceil(length / 64)), 32, 64)
            sage = sagesla_attention_triton(q, k, v, proj, topk, HOPPER_LIKE)
            sla = sla_attention_triton(q, k, v, proj, topk, 32, 64)
            results[f"L={length}/topk={topk}"] = {
                "unwritten": unwritten(sage) + unwritten(sla),
                "sagesla_rel_l2": F.rel_l2(sage, exact + linear),
                "sla_rel_l2": F.rel_l2(sla, exact + linear),
            }
    out["ragged"] = results


def main() -> None:
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    results: dict = {}
    for case in (prepass_cases, selection_cases, attention_cases, ragged_cases):
        case(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
