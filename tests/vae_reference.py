"""Test helpers for the Wan 2.1 VAE: random weights in the original layout and diffusers as the reference.

The original-layout state dict takes its key names and shapes from `WanVAE` built on `meta`; it becomes the
diffusers reference through diffusers' own converter (`convert_wan_vae_to_diffusers`) and a strict load into
`AutoencoderKLWan`, so a wrong name or shape in `WanVAE` fails there. Every parameter is randomised
(FORMATS.md section 5): conv weights normal / sqrt(fan_in), norm gammas uniform in 1 +- 0.2, biases small;
the decoder's last conv is scaled by 0.3 so that the [-1, 1] clamp rarely triggers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from comfyui_turbodiffusion.wan_models.vae import WanVAE
from pipeline_torchvision import import_transforms_v2
from safetensors.torch import save_file

# TURBODIFFUSION.md section 7.3, written out here so the module's own constants are checked too.
SPEC_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
SPEC_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

DECODER_OUT_KEYS = ("decoder.head.2.weight", "decoder.head.2.bias")


def random_original_state_dict(base_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in WanVAE(base_dim).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("gamma"):
            value = 1.0 + 0.4 * (torch.rand(shape, generator=generator) - 0.5)
        elif name.endswith("bias"):
            value = 0.05 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[1] * math.prod(shape[2:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[name] = value * 0.3 if name in DECODER_OUT_KEYS else value
    return state


def diffusers_vae(original_state: dict[str, torch.Tensor], base_dim: int):
    """diffusers `AutoencoderKLWan` holding the same weights (converted by diffusers itself)."""
    import_transforms_v2()  # lets diffusers import next to a CPU torch (see pipeline_torchvision)
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = AutoencoderKLWan(base_dim=base_dim, z_dim=16)
    model.load_state_dict(convert_wan_vae_to_diffusers(dict(original_state)), strict=True)
    return model.eval()


def latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(SPEC_MEAN).view(1, -1, 1, 1, 1), torch.tensor(SPEC_STD).view(1, -1, 1, 1, 1)


@torch.no_grad()
def reference_encode(model, video: torch.Tensor) -> torch.Tensor:
    """Normalised posterior mean, (mu - mean) / std."""
    mean, std = latent_stats()
    return (model.encode(video).latent_dist.mean - mean) / std


@torch.no_grad()
def reference_decode(model, latent: torch.Tensor) -> torch.Tensor:
    """diffusers decode (clamped to [-1, 1]) of the de-normalised latent."""
    mean, std = latent_stats()
    return model.decode(latent * std + mean).sample


def write_vae_files(state: dict[str, torch.Tensor], reference, folder: Path) -> dict[str, Path]:
    """The same weights as Wan2.1_VAE.pth, ComfyUI safetensors (original names) and a diffusers folder."""
    paths = {
        "original_pth": folder / "Wan2.1_VAE.pth",
        "comfyui_safetensors": folder / "wan_2.1_vae.safetensors",
        "diffusers_folder": folder / "diffusers_vae",
    }
    torch.save(dict(state), paths["original_pth"])
    save_file({key: value.contiguous() for key, value in state.items()}, str(paths["comfyui_safetensors"]))
    reference.save_pretrained(paths["diffusers_folder"])
    return paths
