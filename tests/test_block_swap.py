"""Block swap (issue 6): a WanDiT with its last blocks streamed from CPU memory computes bit-identical outputs
to the resident model; memory plans follow the byte counts and refuse a budget that is too small, naming the
budget that would work."""

from __future__ import annotations

import re

import pytest
import torch
from comfyui_turbodiffusion.wan_models.block_swap import (
    GIB,
    MemoryBudgetError,
    enable_block_swap,
    estimate_activation_bytes,
    plan_block_swap,
    tensor_bytes,
)
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import WanDiT
from comfyui_turbodiffusion.wan_models.dit_loader import load_dit
from comfyui_turbodiffusion.wan_models.quantize import quantize_model_linears_
from dit_reference import make_diffusers_model, make_inputs, randomise_, to_original_layout
from safetensors.torch import save_file

TINY = WanDiTConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=4, text_dim=64)


def _sdpa(q, k, v, proj_l=None):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    return out.transpose(1, 2)


def _tiny_model(dtype=torch.float32, seed=0) -> WanDiT:
    model = WanDiT(TINY, self_attention=_sdpa, cross_attention=_sdpa)
    randomise_(model, seed)
    return model.to(dtype).eval()


def _inputs():
    x, t, context, _ = make_inputs(16, latent=(2, 16, 3, 4, 6), seed=3)
    return x, t, context


def _forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("swapped", [1, 2, 3, 4])
def test_swapped_model_is_bit_identical_to_the_resident_one(swapped):
    model = _tiny_model()
    inputs = _inputs()
    expected = _forward(model, inputs)

    swap = enable_block_swap(model, swapped)
    first, second = _forward(model, inputs), _forward(model, inputs)

    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(model.block_swap_slots) == min(swapped, 2)
    swap.remove()
    assert torch.equal(_forward(model, inputs), expected)
    assert not hasattr(model, "block_swap_slots")


def test_int8_bf16_model_loaded_from_a_file_swaps_bit_identically(tmp_path):
    """The real path: load_dit of a release-style file, quantised at load, bf16 W8A8 compute."""
    original = to_original_layout(make_diffusers_model(16, seed=9).state_dict())
    save_file(original, tmp_path / "diffusion_pytorch_model.safetensors")
    model = load_dit(
        tmp_path / "diffusion_pytorch_model.safetensors", dtype=torch.bfloat16, linear_quant="int8"
    )
    x, t, context, _ = make_inputs(16, seed=4)
    expected = _forward(model, (x, t, context))

    enable_block_swap(model, 2)

    assert torch.equal(_forward(model, (x, t, context)), expected)


def test_state_dict_counts_what_occupies_the_device():
    model = _tiny_model(torch.bfloat16)
    quantize_model_linears_(model, "int8")
    block = tensor_bytes(model.blocks[0])
    total = tensor_bytes(model)

    enable_block_swap(model, 3)

    # Three blocks left for the CPU, two staging slots came: ComfyUI's module_size sums the state dict.
    device_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert device_bytes == total - block
    assert not any(key.startswith("blocks.3.") for key in model.state_dict())
    with pytest.raises(ValueError, match="already enabled"):
        enable_block_swap(model, 1)
    with pytest.raises(ValueError, match="between 1 and 4"):
        enable_block_swap(_tiny_model(), 5)


def test_plan_swaps_the_fewest_blocks_that_fit():
    model = _tiny_model(torch.bfloat16)
    tokens = 3 * 2 * 3
    block = tensor_bytes(model.blocks[0])
    other = tensor_bytes(model) - 4 * block
    activations = estimate_activation_bytes(TINY, tokens)

    def plan_for(budget_bytes):
        return plan_block_swap(model, budget_bytes / GIB, tokens)

    everything = other + 4 * block + activations
    assert plan_for(everything).swapped_blocks == 0
    # One block short: swapping 1 or 2 blocks saves nothing (they need as many slots), 3 saves one block.
    assert plan_for(everything - 1).swapped_blocks == 3
    plan = plan_for(other + 2 * block + activations)
    assert plan.swapped_blocks == 4 and plan.device_bytes == other + 2 * block + activations
    assert plan.device_weight_bytes == other + 2 * block


def test_too_small_a_budget_names_the_budget_needed():
    model = _tiny_model(torch.bfloat16)
    tokens = 21 * 45 * 80  # 720p, 81 frames
    need = (
        tensor_bytes(model) - 2 * tensor_bytes(model.blocks[0]) + estimate_activation_bytes(TINY, tokens)
    ) / GIB

    with pytest.raises(MemoryBudgetError) as error:
        plan_block_swap(model, need * 0.9, tokens)

    message = str(error.value)
    assert f"max_vram_gb={need * 0.9:g} is too small" in message
    assert f"needs about {need:.1f} GB" in message
    suggested = float(re.search(r"at least (\d+\.\d)", message).group(1))
    assert suggested >= need
    assert plan_block_swap(model, suggested, tokens).device_bytes <= suggested * GIB


def test_activation_estimate_scales_with_tokens_and_batch():
    config = WanDiTConfig.from_name("wan2.1-t2v-14b")
    one = estimate_activation_bytes(config, 75600)
    assert estimate_activation_bytes(config, 75600, batch=2) == pytest.approx(2 * one, rel=1e-6)
    # 14B at 720p: about 32 bytes per token and channel (attention phase), i.e. ~13-14 GB.
    assert 12 * GIB < one < 15 * GIB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_swapped_model_on_cuda_is_bit_identical():
    model = _tiny_model(torch.bfloat16).cuda()
    inputs = tuple(t.cuda() for t in _inputs())
    expected = _forward(model, inputs)
    enable_block_swap(model, 3)
    assert next(model.block_swap_slots.parameters()).is_cuda
    for _ in range(3):
        assert torch.equal(_forward(model, inputs), expected)
