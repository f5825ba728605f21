"""Block-swap planning for a whole job (issue 6): memory that stays on the device beside the expert (the VAE,
the sampler's state) is taken out of the budget before the blocks are planned, and named in the error."""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.wan_models.block_swap import (
    GIB,
    MemoryBudgetError,
    estimate_activation_bytes,
    plan_block_swap,
    tensor_bytes,
)
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import WanDiT

CONFIG = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=6, text_dim=64, in_dim=36)
TOKENS = 3 * 4 * 6


def _model() -> WanDiT:
    with torch.device("meta"):  # byte counts only
        return WanDiT(CONFIG, self_attention=None, cross_attention=None).to(torch.bfloat16)


def test_reserved_memory_comes_out_of_the_budget():
    model = _model()
    block = tensor_bytes(model.blocks[0])
    other = tensor_bytes(model) - CONFIG.num_layers * block
    activations = estimate_activation_bytes(CONFIG, TOKENS)
    reserved = 5 * block // 2
    # Everything resident fits the budget alone, but not beside the reserved bytes: with 2.5 blocks reserved,
    # 3 of 6 resident blocks must go (swapping n >= 2 blocks frees n - 2 of them, the slots take two).
    budget = (other + CONFIG.num_layers * block + activations) / GIB

    assert plan_block_swap(model, budget, TOKENS).swapped_blocks == 0
    plan = plan_block_swap(model, budget, TOKENS, reserved_bytes=reserved)
    assert plan.swapped_blocks == 5
    assert plan.device_bytes + reserved <= budget * GIB
    assert plan.device_bytes + block + reserved > budget * GIB  # one block fewer swapped would not fit


def test_the_error_names_the_reserved_memory_and_a_budget_that_works():
    model = _model()
    reserved = 3 * GIB // 2
    with pytest.raises(MemoryBudgetError, match=r"other memory on the device 1\.50 GB\)") as error:
        plan_block_swap(model, 1.0, TOKENS, reserved_bytes=reserved)
    suggested = float(str(error.value).split("at least ")[1].split(",")[0])
    assert suggested > 1.5
    plan = plan_block_swap(model, suggested, TOKENS, reserved_bytes=reserved)
    assert plan.device_bytes + reserved <= suggested * GIB
