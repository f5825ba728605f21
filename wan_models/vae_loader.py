"""Loading the Wan 2.1 VAE from any of its published layouts, recognised by content (never by file name).

Layouts (FORMATS.md section 2): the original names of `Wan2.1_VAE.pth` (fp32 pickle) and ComfyUI's
`wan_2.1_vae.safetensors` (fp32/fp16/bf16), also under the `vae.` or `first_stage_model.` prefix of a full
ComfyUI checkpoint; and diffusers `AutoencoderKLWan` folders, whose names are mapped back to the original
ones. The base width comes from `decoder.head.0.gamma`. Weights are loaded strictly into a `WanVAE` built on
the meta device, so the weights are never held twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_io import CheckpointError, naming_file, read_state_dict
from .vae import LATENT_CHANNELS, WanVAE

# Full ComfyUI checkpoints keep the VAE under "vae." (Wan models) or "first_stage_model." (the default).
PREFIXES = ("", "vae.", "first_stage_model.")
MARKERS = {
    "original": "decoder.middle.0.residual.0.gamma",
    "diffusers": "decoder.mid_block.resnets.0.norm1.gamma",
}
BASE_DIM_KEYS = {"original": "decoder.head.0.gamma", "diffusers": "decoder.norm_out.gamma"}
LATENT_CONV_KEYS = {"original": "conv2.weight", "diffusers": "post_quant_conv.weight"}
WAN22_VAE_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"
WAN22_LATENT_CHANNELS = 48
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHOWN_KEYS = 5
SUPPORTED_FILES = (
    "Wan2.1_VAE.pth, ComfyUI's wan_2.1_vae.safetensors (or a full ComfyUI checkpoint holding it), "
    "or a diffusers AutoencoderKLWan folder"
)
# Key fragments of models that get mistaken for the VAE, and what to say about them.
OTHER_MODELS = (
    (
        "a Wan DiT (diffusion model); load it with the model loader",
        ("blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight", "patch_embedding.weight"),
    ),
    (
        "a umT5 text encoder; load it with the text-encoder loader",
        ("token_embedding.weight", "shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"),
    ),
    (
        "a CLIP image encoder, which TurboDiffusion does not use",
        ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", "visual.proj"),
    ),
    (
        "an image VAE of another model family (e.g. Stable Diffusion or Flux), not the Wan 2.1 video VAE",
        ("decoder.up.0.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"),
    ),
)

# diffusers resnet parts -> positions in the original `residual` Sequential (FORMATS.md section 2.1).
_RESNET_PARTS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
_DIFFUSERS_RENAMES = (
    (re.compile(r"^quant_conv\.(.+)$"), "conv1.{0}"),
    (re.compile(r"^post_quant_conv\.(.+)$"), "conv2.{0}"),
    (re.compile(r"^(encoder|decoder)\.conv_in\.(.+)$"), "{0}.conv1.{1}"),
    (re.compile(r"^(encoder|decoder)\.norm_out\.(.+)$"), "{0}.head.0.{1}"),
    (re.compile(r"^(encoder|decoder)\.conv_out\.(.+)$"), "{0}.head.2.{1}"),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$"), "{0}.middle.1.{1}"),
)
_MID_RESNET = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.+)$")
_DOWN_BLOCK = re.compile(r"^encoder\.down_blocks\.(\d+)\.(\w+)\.(.+)$")
_UP_RESNET = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)$")
_UP_SAMPLER = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$")
# Each decoder stage is 3 residual blocks followed by its upsampler in the original flat list.
_DECODER_STAGE_LENGTH = 4


@dataclass(frozen=True)
class VAELayout:
    """What a VAE state dict holds, read from key names and shapes alone."""

    naming: str  # "original" (Wan / ComfyUI) or "diffusers"
    prefix: str
    base_dim: int


def detect_vae_layout(state: Mapping[str, torch.Tensor]) -> VAELayout:
    """The layout of a Wan 2.1 VAE state dict (real or meta tensors); CheckpointError if it is not one."""
    for prefix in PREFIXES:
        for naming, marker in MARKERS.items():
            if prefix + marker in state:
                _reject_other_latent_widths(state, naming, prefix)
                base_dim = state[prefix + BASE_DIM_KEYS[naming]].shape[0]
                return VAELayout(naming, prefix, base_dim)
    raise CheckpointError(_not_a_vae_message(state))


def diffusers_to_original_key(key: str) -> str:
    """The original Wan name of a diffusers `AutoencoderKLWan` key (unknown keys come back unchanged)."""
    for pattern, template in _DIFFUSERS_RENAMES:
        match = pattern.match(key)
        if match:
            return template.format(*match.groups())
    match = _MID_RESNET.match(key)
    if match:
        side, index, part, rest = match.groups()
        return f"{side}.middle.{2 * int(index)}.{_RESNET_PARTS.get(part, part)}.{rest}"
    match = _DOWN_BLOCK.match(key)
    if match:
        index, part, rest = match.groups()
        return f"encoder.downsamples.{index}.{_RESNET_PARTS.get(part, part)}.{rest}"
    match = _UP_RESNET.match(key)
    if match:
        stage, block, part, rest = match.groups()
        index = _DECODER_STAGE_LENGTH * int(stage) + int(block)
        return f"decoder.upsamples.{index}.{_RESNET_PARTS.get(part, part)}.{rest}"
    match = _UP_SAMPLER.match(key)
    if match:
        stage, rest = match.groups()
        return f"decoder.upsamples.{_DECODER_STAGE_LENGTH * int(stage) + _DECODER_STAGE_LENGTH - 1}.{rest}"
    return key


def load_vae(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> WanVAE:
    """A WanVAE with the weights of a file or folder, ready for inference (eval, no gradients).

    dtype None keeps the file's floating dtype (TurboDiffusion runs the VAE in bfloat16).
    """
    path = Path(path)
    try:
        return _load(path, torch.device(device), dtype)
    except CheckpointError as error:
        raise naming_file(error, path) from None


def _load(path: Path, device: torch.device, dtype: torch.dtype | None) -> WanVAE:
    # Read on the CPU: a full checkpoint may hold a whole DiT beside the VAE, and only the VAE goes on.
    state = read_state_dict(path, "cpu")
    layout = detect_vae_layout(state)
    weights = {
        key[len(layout.prefix) :]: value for key, value in state.items() if key.startswith(layout.prefix)
    }
    del state
    if layout.naming == "diffusers":
        weights = {diffusers_to_original_key(key): value for key, value in weights.items()}
    dtype = dtype or _file_dtype(weights)
    with torch.device("meta"):
        model = WanVAE(layout.base_dim)
    _check_keys_and_shapes(weights, model, layout)
    weights = {key: value.to(device=device, dtype=dtype) for key, value in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def _reject_other_latent_widths(state: Mapping[str, torch.Tensor], naming: str, prefix: str) -> None:
    latent_conv = state.get(prefix + LATENT_CONV_KEYS[naming])
    channels = None if latent_conv is None else latent_conv.shape[0]
    if prefix + WAN22_VAE_KEY in state or channels == WAN22_LATENT_CHANNELS:
        raise CheckpointError(
            "this is the Wan 2.2 VAE (48 latent channels, used by Wan2.2-TI2V-5B), which TurboDiffusion does "
            "not use; the Wan2.1 T2V and Wan2.2 I2V A14B models need the Wan 2.1 VAE (Wan2.1_VAE.pth or "
            "wan_2.1_vae.safetensors)"
        )
    if channels is not None and channels != LATENT_CHANNELS:
        raise CheckpointError(
            f"this VAE has {channels} latent channels; the Wan 2.1 VAE has {LATENT_CHANNELS}. "
            f"Use {SUPPORTED_FILES}"
        )


def _not_a_vae_message(state: Mapping[str, torch.Tensor]) -> str:
    for description, fragments in OTHER_MODELS:
        if any(key.endswith(fragment) for key in state for fragment in fragments):
            return f"not a Wan 2.1 VAE: the file holds {description}"
    shown = ", ".join(list(state)[:SHOWN_KEYS])
    return f"not a Wan 2.1 VAE (no decoder.middle.* keys; first keys: {shown}). Use {SUPPORTED_FILES}"


def _file_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most weights; 8-bit floats compute in bfloat16, float64 in float32."""
    elements: dict[torch.dtype, int] = {}
    for value in weights.values():
        if value.is_floating_point():
            elements[value.dtype] = elements.get(value.dtype, 0) + value.numel()
    dtype = max(elements, key=elements.__getitem__)
    if dtype in COMPUTE_DTYPES:
        return dtype
    return torch.bfloat16 if dtype.itemsize == 1 else torch.float32


def _check_keys_and_shapes(weights: Mapping[str, torch.Tensor], model: WanVAE, layout: VAELayout) -> None:
    expected = {key: tensor.shape for key, tensor in model.state_dict().items()}
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:SHOWN_KEYS])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:SHOWN_KEYS])}")
    mismatched = [
        f"{key} {tuple(weights[key].shape)} (expected {tuple(shape)})"
        for key, shape in expected.items()
        if key in weights and weights[key].shape != shape
    ]
    if mismatched:
        problems.append(
            f"{len(mismatched)} tensors with wrong shapes, e.g. {', '.join(mismatched[:SHOWN_KEYS])}"
        )
    if problems:
        raise CheckpointError(
            f"looks like a Wan 2.1 VAE ({layout.naming} names, base width {layout.base_dim}) but does not "
            f"match it: {'; '.join(problems)}. The file may be damaged or a different model; use "
            f"{SUPPORTED_FILES}"
        )
