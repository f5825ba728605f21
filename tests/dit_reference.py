"""Independent references for the DiT tests: a tiny diffusers Wan transformer with random weights, and the
same weights written in the other checkpoint layouts with key maps and formulas written here from
FORMATS.md §1 and TURBODIFFUSION.md §3 / §11.1 (not taken from the code under test)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from pipeline_torchvision import import_transforms_v2

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=128,
    out_channels=16,
    text_dim=64,
    freq_dim=256,
    ffn_dim=256,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
TIMES = (937.0, 250.5)

# FORMATS.md §1.2, diffusers name (before .weight/.bias) -> original / ComfyUI / TurboDiffusion name.
TOP_LEVEL_NAMES = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
}
BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
BLOCK_LINEARS += ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def diffusers_wan_class():
    import_transforms_v2()  # lets transformers (imported by diffusers) import the CUDA-only torchvision
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (FORMATS.md §5): matrices N(0, 1/fan_in), norms 1 ± 0.2, others small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() >= 2 and "scale_shift_table" not in name:
                parameter.copy_(noise / math.sqrt(parameter[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * (2 * torch.rand(parameter.shape, generator=generator) - 1))
            else:
                parameter.copy_(0.1 * noise)


def make_diffusers_model(in_channels: int = 16, seed: int = 0):
    model = diffusers_wan_class()(in_channels=in_channels, **TINY).eval()
    randomise_(model, seed)
    return model


def make_inputs(in_channels: int = 16, latent=(2, 16, 3, 4, 4), seed: int = 1):
    """x, t, context (random rows then zeros, like padded umT5 output) and y for I2V models."""
    generator = torch.Generator().manual_seed(seed)
    batch, _, frames, height, width = latent
    x = torch.randn(latent, generator=generator)
    context = torch.zeros(batch, 512, TINY["text_dim"])
    context[:, :7] = torch.randn(batch, 7, TINY["text_dim"], generator=generator)
    t = torch.tensor(TIMES[:batch])
    y = None
    if in_channels > 16:
        y = torch.randn(batch, in_channels - 16, frames, height, width, generator=generator)
    return x, t, context, y


def diffusers_forward(model, x, t, context, y=None) -> torch.Tensor:
    hidden = x if y is None else torch.cat([x, y], dim=1)
    with torch.no_grad():
        return model(hidden, t, context, return_dict=False)[0].float()


class DiffusersNetwork(torch.nn.Module):
    """diffusers' Wan transformer behind the `net(x, t, context, y)` call of the spec sampler."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, t, context, y=None):
        return diffusers_forward(self.model, x, t, context, y)


def original_name(diffusers_key: str) -> str:
    """The original / ComfyUI / TurboDiffusion name of a diffusers WanTransformer3DModel key."""
    if diffusers_key == "scale_shift_table":
        return "head.modulation"
    if diffusers_key.endswith(".scale_shift_table"):
        return diffusers_key.replace("scale_shift_table", "modulation")
    block = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", diffusers_key)
    if block:
        index, module, parameter = block.groups()
        return f"blocks.{index}.{BLOCK_NAMES[module]}.{parameter}"
    module, parameter = diffusers_key.rsplit(".", 1)
    return f"{TOP_LEVEL_NAMES[module]}.{parameter}"


def to_original_layout(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan / ComfyUI key names (5-D patch embedding) from a diffusers state dict."""
    return {original_name(key): tensor for key, tensor in diffusers_state.items()}


def from_original_layout(original: dict[str, torch.Tensor], diffusers_keys) -> dict[str, torch.Tensor]:
    """A diffusers state dict holding the tensors of an original-layout state dict."""
    return {key: original[original_name(key)] for key in diffusers_keys}


def to_turbodiffusion_layout(original: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    """TurboDiffusion .pth: 2-D patch embedding, one random SLA proj_l per block (TURBODIFFUSION.md §3.1)."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(original)
    out["patch_embedding.weight"] = original["patch_embedding.weight"].reshape(
        original["patch_embedding.weight"].shape[0], -1
    )
    blocks = {int(key.split(".")[1]) for key in original if key.startswith("blocks.")}
    head_dim = TINY["attention_head_dim"]
    for index in blocks:
        prefix = f"blocks.{index}.self_attn.attn_op.local_attn.proj_l."
        out[prefix + "weight"] = torch.randn(head_dim, head_dim, generator=generator) / math.sqrt(head_dim)
        out[prefix + "bias"] = 0.1 * torch.randn(head_dim, generator=generator)
    return out


def quantize_tiles_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TURBODIFFUSION.md §11.1: per 128x128 tile, amax = max(1e-8, max|w|), q = round_half_even(w * 128 /
    amax) saturated to [-128, 127], scale = amax / 128."""
    rows, columns = weight.shape
    tile_rows, tile_columns = math.ceil(rows / 128), math.ceil(columns / 128)
    q = torch.empty(rows, columns, dtype=torch.int8)
    scale = torch.empty(tile_rows, tile_columns, dtype=torch.float32)
    for i in range(tile_rows):
        for j in range(tile_columns):
            tile = weight[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = max(tile.abs().max().item(), 1e-8)
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (
                torch.round(tile * (128 / amax)).clamp(-128, 127).to(torch.int8)
            )
            scale[i, j] = amax / 128
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, columns = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            out[rows, columns] = q[rows, columns].float() * scale[i, j]
    return out


def to_quant_layout(turbo: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TurboDiffusion -quant .pth: every Linear inside blocks except proj_l as int8_weight + scale + bias."""
    out = {}
    for key, tensor in turbo.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.split(".", 2)[-1] in BLOCK_LINEARS:
            out[module + ".int8_weight"], out[module + ".scale"] = quantize_tiles_int8(tensor)
        else:
            out[key] = tensor
    return out


def write_tiny_release(folder: Path, model_seed: int, input_seed: int) -> dict:
    """One random tiny model as TurboDiffusion's release files in `folder`: TurboWan-tiny.pth (bf16, float32
    norms) and TurboWan-tiny-quant.pth made from it by the spec formula, plus diffusers' float32 outputs of
    the same weights on random inputs. Returns folder, bf16 and quant (the state dicts), inputs, expected."""
    diffusers_model = make_diffusers_model(16, seed=model_seed)
    turbo = to_turbodiffusion_layout(to_original_layout(diffusers_model.state_dict()))
    bf16 = {key: value if ".norm" in key else value.to(torch.bfloat16) for key, value in turbo.items()}
    quant = to_quant_layout(bf16)
    torch.save(bf16, folder / "TurboWan-tiny.pth")
    torch.save(quant, folder / "TurboWan-tiny-quant.pth")
    inputs = make_inputs(16, seed=input_seed)
    expected = diffusers_forward(diffusers_model, *inputs)
    return {"folder": folder, "bf16": bf16, "quant": quant, "inputs": inputs, "expected": expected}
