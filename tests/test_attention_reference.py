"""The PyTorch SLA / SageSLA reference (turbo_kernels.sla_reference) against float64 formulas written from the
spec (tests/attention_formulas.py) and against PyTorch's own dense attention."""

from __future__ import annotations

import math

import attention_formulas as F
import pytest
import torch
from attention_inputs import dit_like_qkv, random_projection, random_qkv
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R

INPUTS = {"random": random_qkv, "dit": dit_like_qkv}


def test_sparse_branch_with_all_blocks_is_dense_attention():
    q, k, v = random_qkv(1, 1000, 2, 64, seed=1, dtype=torch.float64)
    qh, kh, vh = (R.heads_first(x) for x in (q, k, v))
    lut, counts = R.block_map(qh, kh, 128, 64, 1.0)
    assert lut.shape == (2, 8, 16)
    sparse = R.tokens_first(R.block_sparse_attention(qh, kh, vh, lut, counts, 128, 64), 1)
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    torch.testing.assert_close(sparse, dense.transpose(1, 2), rtol=1e-10, atol=1e-12)


def test_sla_at_topk_1_is_dense_attention_plus_linear_branch():
    q, k, v = random_qkv(1, 700, 2, 64, seed=2, dtype=torch.float64)
    proj = random_projection(64, seed=3, dtype=torch.float64)
    out = R.sla_attention_reference(q, k, v, proj, topk=1.0)
    expected = F.masked_attention(q, k, v, None, 1, 1) + F.linear_branch(q, k, v, proj.weight, proj.bias)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sla_matches_float64_formula(kind, dtype):
    q, k, v = INPUTS[kind](1, 1500, 2, 64, seed=4, dtype=dtype)
    proj = random_projection(64, seed=5)
    out = R.sla_attention_reference(q, k, v, proj, topk=0.1)
    mask = F.block_mask(q, k, 128, 64, 0.1)
    assert mask.sum(-1).unique().tolist() == [2]  # 24 key blocks, int(0.1·24) = 2 per query block
    expected = F.masked_attention(q, k, v, mask, 128, 64) + F.linear_branch(q, k, v, proj.weight, proj.bias)
    assert F.rel_l2(out, expected) < (1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("length", [1000, 4097])
@pytest.mark.parametrize("blocks", [(64, 128), (128, 64)])
def test_block_selection_equals_float64_top_k(kind, length, blocks):
    q, k, _ = INPUTS[kind](1, length, 3, 64, seed=length, dtype=torch.bfloat16)
    qh, kh = R.heads_first(q), R.heads_first(k)
    for topk in (0.1, 0.15, 0.5):
        lut, counts = R.block_map(qh, kh, *blocks, topk)
        k_sel = F.top_k_count(math.ceil(length / blocks[1]), topk)
        assert lut.shape[-1] == k_sel and bool((counts == k_sel).all())
        assert bool((lut[..., 1:] > lut[..., :-1]).all()), "LUT rows must be strictly ascending"
        assert F.selection_mismatches(lut, F.block_scores(q, k, *blocks)) == 0


def test_ragged_last_blocks_average_their_valid_tokens():
    x = torch.arange(2 * 5 * 3, dtype=torch.float64).reshape(2, 5, 3)
    means = R.block_means(x, 2)
    torch.testing.assert_close(means[:, 2], x[:, 4])
    torch.testing.assert_close(means[:, 0], x[:, :2].mean(dim=1))


@pytest.mark.parametrize("recipe", [R.HOPPER_RECIPE, R.AMPERE_RECIPE, R.DEFAULT_RECIPE], ids=str)
@pytest.mark.parametrize("kind", INPUTS)
def test_sagesla_emulation_within_kernel_tolerances(recipe, kind):
    """KERNELS.md §1.9: INT8+FP8 rel-L2 <= 0.05, cos >= 0.9985; INT8+FP16 rel-L2 <= 0.04, cos >= 0.999."""
    q, k, v = INPUTS[kind](1, 4000, 2, 128, seed=6)
    qh, kh, vh = (R.heads_first(x) for x in (q, k, v))
    lut, counts = R.block_map(qh, kh, recipe.blkq, recipe.blkk, 0.15)
    sparse = R.tokens_first(R.sage_sparse_attention(qh, kh, vh, lut, counts, recipe), 1)
    mask = F.mask_from_lut(lut, 1, math.ceil(4000 / recipe.blkk))
    exact = F.masked_attention(q, k, v, mask, recipe.blkq, recipe.blkk)
    rel_bound, cos_bound = (0.05, 0.9985) if recipe.pv_dtype == "fp8" else (0.04, 0.999)
    assert F.rel_l2(sparse, exact) <= rel_bound
    assert F.cosine(sparse, exact) >= cos_bound
    assert F.rel_l2(sparse, exact) > 1e-4, "the emulation must actually quantise"

    proj = random_projection(128, seed=7)
    full = R.sagesla_attention_reference(q, k, v, proj, 0.15, recipe)
    expected = exact + F.linear_branch(q, k, v, proj.weight, proj.bias)
    assert F.rel_l2(full, expected) <= rel_bound


def test_dense_sage_emulation_within_tolerance():
    q, k, v = dit_like_qkv(1, 3000, 2, 128, seed=8)
    out = R.sage_dense_attention_reference(q, k, v, R.HOPPER_RECIPE)
    exact = F.masked_attention(q, k, v, None, 1, 1)
    assert F.rel_l2(out, exact) <= 0.05 and F.cosine(out, exact) >= 0.9985


def test_quantisers_follow_the_spec():
    x = torch.tensor([[[0.5, -1.27, 2.54], [-2.54, 0.0, 1.905]]], dtype=torch.float32)
    values, scale = R.quantize_int8_blocks(x, 2)
    expected_scale = 2.54 / 127 + 1e-7
    torch.testing.assert_close(scale, torch.tensor([[expected_scale]]))
    ratio = x / expected_scale
    expected = torch.sign(ratio) * torch.floor(ratio.abs() + 0.5)  # round half away from zero
    torch.testing.assert_close(values[0, 0], expected[0])
    v = torch.tensor([[[1.0, 0.0], [-4.5, 0.0]]])
    v8, v_scale = R.quantize_values(v, "fp8")
    torch.testing.assert_close(v_scale, torch.tensor([[4.5 / 2.25, 1.0]]))
    assert v8.abs().max() == 2.25 and v8[0, :, 1].abs().max() == 0


@pytest.mark.parametrize("length", [100, 127, 129])
def test_empty_selection_outputs_the_linear_branch_without_nan(length):
    """k_sel = int(0.1·N_K) = 0 for short sequences: TurboDiffusion divides 0 by 0, we return 0 + linear."""
    q, k, v = random_qkv(1, length, 2, 64, seed=length, dtype=torch.float32)
    proj = random_projection(64, seed=9)
    linear = F.linear_branch(q, k, v, proj.weight, proj.bias)
    for out in (
        R.sla_attention_reference(q, k, v, proj, topk=0.1),
        R.sagesla_attention_reference(q, k, v, proj, 0.1, R.HOPPER_RECIPE),
    ):
        assert bool(out.isfinite().all())
        assert F.rel_l2(out, linear) < 1e-5
    assert not R.sla_attention_reference(q, k, v, None, topk=0.1).any()


def test_recipes_follow_the_architecture_table():
    assert R.sage_recipe((9, 0)) == R.SageRecipe(64, 128, "fp8")
    for ampere in ((8, 0), (8, 6), (8, 7)):
        assert R.sage_recipe(ampere) == R.SageRecipe(128, 64, "fp16")
    for other in ((8, 9), (12, 0), (10, 0)):
        assert R.sage_recipe(other) == R.SageRecipe(128, 64, "fp8")
    assert [R.selected_block_count(n, t) for n, t in ((512, 0.1), (512, 0.15), (591, 0.1), (9, 0.1))] == [
        51,
        76,
        59,
        0,
    ]
