"""A tiny bf16 Wan DiT with fp8 W8A8 linears, and its per-linear reference: every fp8 linear swapped for a
module that quantises its own input with the per-token e4m3 formula (`quantize_rows_e4m3`, FORMATS/KERNELS
§4.6) and multiplies in float32, as the fp8 path computed before the block quantised shared inputs once."""

from __future__ import annotations

import copy

import torch
from comfyui_turbodiffusion.turbo_kernels.fp8_linear import quantize_rows_e4m3
from comfyui_turbodiffusion.wan_models.attention import sdpa_attention
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import WanDiT
from comfyui_turbodiffusion.wan_models.linear_layers import Fp8Linear
from comfyui_turbodiffusion.wan_models.quantize import quantize_model_linears_
from torch import nn

CONFIG = dict(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32)


class PerLinearFp8(nn.Module):
    """y = T(Xq·Wqᵀ·sx·sw) + b with Xq, sx from x alone: one quantisation per call."""

    def __init__(self, layer: Fp8Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        codes, scale = quantize_rows_e4m3(x.reshape(-1, x.shape[-1]))
        product = codes.float() @ layer.weight.float().T
        out = (product * (scale[:, None] * layer.weight_scale[None, :])).to(x.dtype)
        out = out + layer.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], layer.out_features)


def tiny_fp8_dit(seed: int = 0) -> WanDiT:
    """Every parameter random (norm weights near 1), bf16, the block linears quantised to fp8."""
    torch.manual_seed(seed)
    model = WanDiT(WanDiTConfig(**CONFIG), self_attention=sdpa_attention, cross_attention=sdpa_attention)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                tensor.uniform_(0.8, 1.2)
            elif tensor.dim() >= 2 and "modulation" not in name:
                tensor.normal_(0, tensor.shape[-1] ** -0.5)
            else:
                tensor.normal_(0, 0.1)
    model = model.to(torch.bfloat16).requires_grad_(False).eval()
    quantize_model_linears_(model, "fp8")
    return model


def per_linear_reference(model: WanDiT) -> WanDiT:
    """A copy of `model` whose fp8 linears each quantise their own input (`PerLinearFp8`)."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, Fp8Linear):
            parent, _, child = name.rpartition(".")
            owner = reference.get_submodule(parent)
            if isinstance(owner, nn.Sequential):
                owner[int(child)] = PerLinearFp8(module)
            else:
                setattr(owner, child, PerLinearFp8(module))
    return reference


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 6, generator=generator)
    context = torch.randn(1, 512, CONFIG["text_dim"], generator=generator)
    return x, torch.tensor([700.0]), context
