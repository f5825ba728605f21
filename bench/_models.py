"""Random-weight Wan DiT state dicts for the GPU benchmarks (bench/e2e.py, i2v_job.py, profile_forward.py).

Every tensor is random, laid out as released (FORMATS.md §5): bf16 matrices and vectors, float32 norm
weights, so a state dict made here loads through `dit_from_state_dict` like a real checkpoint.
"""

from __future__ import annotations

import math

import torch
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import WanDiT

FP32_NORMS = ("norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias")


def random_weights(shapes: dict, device: str | torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random, as released: matrices N(0, 1/fan_in) in bf16, norm weights 1 ± 0.1 (biases
    ±0.1) in float32, vectors N(0, 0.02²) in bf16."""
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator, device=device)
        if name.endswith(FP32_NORMS):
            state[name] = (1 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise
        elif len(shape) > 1:
            state[name] = (noise / math.sqrt(shape[-1])).to(torch.bfloat16)
        else:
            state[name] = (0.02 * noise).to(torch.bfloat16)
        del noise  # before the next tensor's noise: one float32 matrix at a time (A14B's are 0.3 GB)
    return state


def state_shapes(config: WanDiTConfig) -> dict[str, torch.Size]:
    """Names and shapes of our WanDiT's state dict for `config` (built on the meta device, no memory)."""
    with torch.device("meta"):
        model = WanDiT(config, self_attention=lambda *a, **k: None, cross_attention=lambda *a, **k: None)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}
