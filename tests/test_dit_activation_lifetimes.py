"""A block's L x dim intermediates are released once their last reader has run, so the FFN (the peak of a
forward) holds only the residual stream, its input rows and the hidden rows. At 14B-720p every lingering
bf16 L x dim tensor costs 0.72 GiB, which block swap's activation estimate does not budget for."""

from __future__ import annotations

import gc

import torch
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import WanDiT
from dit_reference import randomise_

CONFIG = WanDiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_dim=32)
LATENT = (1, 16, 3, 6, 10)  # 3 x 3 x 5 = 45 tokens after 1x2x2 patches
TOKENS = 45


def _sdpa(q, k, v, proj_l=None):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    return out.transpose(1, 2)


def _live_rows(width: int, model: torch.nn.Module) -> int:
    """Python-reachable tensors of TOKENS x width rows that are not the model's own weights."""
    weights = {id(t) for t in (*model.parameters(), *model.buffers())}
    return sum(
        isinstance(obj, torch.Tensor)
        and id(obj) not in weights
        and obj.dim() >= 2
        and obj.shape[-1] == width
        and obj.numel() == TOKENS * width
        for obj in gc.get_objects()
    )


def test_ffn_stage_holds_only_the_residual_its_input_and_the_hidden_rows():
    model = WanDiT(CONFIG, self_attention=_sdpa, cross_attention=_sdpa)
    randomise_(model, 0)
    model = model.to(torch.bfloat16).eval()
    block = model.blocks[0]
    seen = {}

    def before_up(module, args):
        seen["up"] = _live_rows(CONFIG.dim, model)

    def before_down(module, args):
        seen["down dim"] = _live_rows(CONFIG.dim, model)
        seen["down hidden"] = _live_rows(CONFIG.ffn_dim, model)

    block.ffn[0].register_forward_pre_hook(before_up)
    block.ffn[2].register_forward_pre_hook(before_down)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(LATENT, generator=generator)
    context = torch.randn(1, 512, CONFIG.text_dim, generator=generator)
    with torch.no_grad():
        model(x, torch.tensor([500.0]), context)

    # Before the up-projection: the block's input (still held by the caller's loop), the updated residual
    # and the FFN input rows; nothing from the attention stages.
    assert seen["up"] == 3, seen
    # Before the down-projection: the two residuals; the FFN input is gone, the hidden rows are its input.
    assert seen["down dim"] == 2, seen
    assert seen["down hidden"] == 1, seen
