"""Tiny random-weight checkpoints in the real release formats, written into a ComfyUI models folder.

Used by the real-host tests and by `make demo` when the real files are absent. Every parameter is random
(FORMATS.md §5); the networks come from the other test helpers (diffusers' Wan transformer, transformers'
umT5, the original-layout VAE), and the files are what the releases look like:

* DiTs as TurboDiffusion `.pth` (2-D patch embedding, SLA `proj_l` per block, bf16 with fp32 norm weights),
  a Wan2.1 T2V model (in_dim 16) and a Wan2.2 I2V high/low expert pair (in_dim 36);
* the VAE as `Wan2.1_VAE.pth` (original key names, fp32, base dim 8 instead of 96);
* the text encoder as ComfyUI's `umt5_xxl_fp16.safetensors` (fp16, tokenizer inside as `spiece_model`).

The returned `TinyModels` keeps float32 reference networks holding exactly the stored (rounded) weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from dit_reference import make_diffusers_model, to_original_layout, to_turbodiffusion_layout
from text_encoder_fixtures import (
    encoder_state,
    make_tiny_umt5,
    model_with_state,
    tokenizer_model_bytes,
    write_comfy_safetensors,
)
from vae_reference import random_original_state_dict

VAE_BASE_DIM = 8
# Norm weights TurboDiffusion's conversion keeps in float32 (TURBODIFFUSION.md §3.1).
FP32_NORM_SUFFIXES = (
    "self_attn.norm_q.weight",
    "self_attn.norm_k.weight",
    "cross_attn.norm_q.weight",
    "cross_attn.norm_k.weight",
    "norm3.weight",
    "norm3.bias",
)
FILE_NAMES = {
    "t2v": "tiny-TurboWan2.1-T2V-480P.pth",
    "i2v_high": "tiny-TurboWan2.2-I2V-A14B-high-720P.pth",
    "i2v_low": "tiny-TurboWan2.2-I2V-A14B-low-720P.pth",
    "vae": "tiny-Wan2.1_VAE.pth",
    "text_encoder": "tiny-umt5_xxl_fp16.safetensors",
}
SEEDS = {"t2v": 10, "i2v_high": 11, "i2v_low": 12, "vae": 3, "text_encoder": 4}


@dataclass
class TinyModels:
    """File names (relative to their model folders) and float32 references with the stored weights."""

    files: dict[str, str]
    dits: dict[str, torch.nn.Module]  # diffusers WanTransformer3DModel per DiT role
    text_encoder: torch.nn.Module  # transformers UMT5EncoderModel
    spiece: bytes
    vae_state: dict[str, torch.Tensor]


def _round_like_release(model: torch.nn.Module) -> None:
    """Round a float32 model's weights to bf16 in place, as the release files store them."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())


def turbodiffusion_release_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers Wan transformer's weights as a TurboDiffusion release `.pth` state dict."""
    state = to_turbodiffusion_layout(to_original_layout(model.state_dict()), seed=seed)
    return {
        key: tensor.float() if key.endswith(FP32_NORM_SUFFIXES) else tensor.to(torch.bfloat16)
        for key, tensor in state.items()
    }


def write_tiny_dit(folder: Path, role: str) -> torch.nn.Module:
    model = make_diffusers_model(in_channels=16 if role == "t2v" else 36, seed=SEEDS[role])
    _round_like_release(model)
    torch.save(turbodiffusion_release_state(model, SEEDS[role]), folder / FILE_NAMES[role])
    return model


def write_tiny_models(models_dir: Path) -> TinyModels:
    """Write the five tiny checkpoints into `models_dir`'s diffusion_models, vae and text_encoders."""
    for sub in ("diffusion_models", "vae", "text_encoders"):
        (models_dir / sub).mkdir(parents=True, exist_ok=True)
    dit_folder = models_dir / "diffusion_models"
    dits = {role: write_tiny_dit(dit_folder, role) for role in ("t2v", "i2v_high", "i2v_low")}
    vae_state = random_original_state_dict(base_dim=VAE_BASE_DIM, seed=SEEDS["vae"])
    torch.save(vae_state, models_dir / "vae" / FILE_NAMES["vae"])
    spiece = tokenizer_model_bytes()
    encoder = make_tiny_umt5(seed=SEEDS["text_encoder"])
    write_comfy_safetensors(
        models_dir / "text_encoders" / FILE_NAMES["text_encoder"], encoder, torch.float16, spiece=spiece
    )
    rounded_encoder = model_with_state(encoder_state(encoder, torch.float16))
    return TinyModels(dict(FILE_NAMES), dits, rounded_encoder, spiece, vae_state)
