"""WanDiT's contract: input validation, injected attention and linears, int8 storage, presets, kinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_turbodiffusion.wan_models.attention import sdpa_attention
from comfyui_turbodiffusion.wan_models.checkpoint_io import CheckpointError
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import AttentionFunctions, WanDiT
from comfyui_turbodiffusion.wan_models.dit_loader import load_dit, require_kind
from comfyui_turbodiffusion.wan_models.linear_layers import (
    Int8Linear,
    dense_linear_factory,
    int8_linear_factory,
)
from dit_reference import make_diffusers_model, make_inputs, to_original_layout, to_turbodiffusion_layout

TINY = dict(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64)


def _write_tiny_turbodiffusion(path, in_channels: int) -> None:
    torch.save(
        to_turbodiffusion_layout(to_original_layout(make_diffusers_model(in_channels).state_dict())), path
    )


def _tiny_model(in_dim: int = 16) -> WanDiT:
    config = WanDiTConfig(**TINY, in_dim=in_dim)
    return WanDiT(config, self_attention=sdpa_attention, cross_attention=sdpa_attention)


@pytest.mark.parametrize(
    ("in_dim", "change", "message"),
    [
        (16, dict(x=torch.zeros(1, 36, 1, 4, 4)), r"x has shape \(1, 36, 1, 4, 4\).*\[B, 16, T, H, W\]"),
        (16, dict(x=torch.zeros(1, 16, 1, 4, 5)), "multiples of 16"),
        (16, dict(y=torch.zeros(1, 20, 1, 4, 4)), "text-to-video model.*takes no image conditioning"),
        (36, dict(), "image-to-video model.*pass y, the 20-channel"),
        (
            36,
            dict(y=torch.zeros(1, 4, 1, 4, 4)),
            r"y has shape \(1, 4, 1, 4, 4\); expected \(1, 20, 1, 4, 4\)",
        ),
        (16, dict(context=torch.zeros(1, 512, 4096)), r"context has shape .*expected \[1, 512, 64\]"),
        (16, dict(t=torch.zeros(3)), "t has 3 values for a batch of 1"),
    ],
)
def test_invalid_inputs_are_explained(in_dim, change, message):
    arguments = dict(x=torch.zeros(1, 16, 1, 4, 4), t=torch.tensor([500.0]), context=torch.zeros(1, 512, 64))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        _tiny_model(in_dim)(**arguments)


def test_injected_attention_receives_heads_layout_and_sla_projection(tmp_path):
    _write_tiny_turbodiffusion(tmp_path / "m.pth", 16)
    self_calls, cross_calls = [], []

    def recording_self_attention(q, k, v, proj_l=None):
        self_calls.append((q.shape, k.shape, v.shape, proj_l))
        return sdpa_attention(q, k, v)

    def recording_cross_attention(q, k, v):
        cross_calls.append(k.shape)
        return sdpa_attention(q, k, v)

    def zero_attention(q, k, v, proj_l=None):
        return torch.zeros_like(q)

    model = load_dit(tmp_path / "m.pth", attention=recording_self_attention)
    model.attention = AttentionFunctions(recording_self_attention, recording_cross_attention)
    x, t, context, _ = make_inputs(16, (2, 16, 3, 4, 6))
    with torch.no_grad():
        first = model(x, t, context)
        model.set_self_attention(zero_attention)
        swapped = model(x, t, context)

    assert len(self_calls) == 2 and len(cross_calls) == 4  # self-attention recorded in the first run only
    assert self_calls[0][:3] == (torch.Size([2, 18, 2, 128]),) * 3
    assert self_calls[1][3] is model.blocks[1].self_attn.attn_op.local_attn.proj_l
    assert cross_calls[0] == torch.Size([2, 512, 2, 128])
    assert (first - swapped).abs().max().item() > 1e-2


def test_int8_linear_dequantises_128x128_tiles_on_ragged_shapes():
    generator = torch.Generator().manual_seed(0)
    layer = Int8Linear(300, 200, bias=True, bias_dtype=torch.float32)
    assert layer.scale.shape == (2, 3)
    assert set(layer.state_dict()) == {"int8_weight", "scale", "bias"}
    with torch.no_grad():
        layer.int8_weight.copy_(torch.randint(-128, 128, (200, 300), generator=generator, dtype=torch.int8))
        layer.scale.copy_(torch.rand(2, 3, generator=generator) / 100)
        layer.bias.copy_(torch.randn(200, generator=generator))
    weight = torch.empty(200, 300)
    for i in range(200):
        for j in range(300):
            weight[i, j] = layer.int8_weight[i, j].item() * layer.scale[i // 128, j // 128].item()
    x = torch.randn(2, 5, 300, generator=generator)

    assert torch.allclose(layer(x), F.linear(x, weight, layer.bias), atol=1e-5)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_linear_factories():
    dense = dense_linear_factory(dtype=torch.float16)(8, 4, bias=False)
    assert isinstance(dense, torch.nn.Linear) and dense.weight.dtype == torch.float16 and dense.bias is None
    with torch.device("meta"):
        quant = int8_linear_factory(bias_dtype=torch.bfloat16)(256, 384)
    assert quant.int8_weight.is_meta and quant.scale.shape == (3, 2) and quant.bias.dtype == torch.bfloat16


def test_presets_and_config_validation():
    config = WanDiTConfig.from_name("wan2.2-i2v-a14b")
    assert (config.dim, config.num_heads, config.head_dim, config.in_dim, config.kind) == (
        5120,
        40,
        128,
        36,
        "i2v",
    )
    assert WanDiTConfig.from_name("wan2.1-t2v-1.3b", has_sla_proj=True).has_sla_proj
    with pytest.raises(
        ValueError, match="unknown Wan DiT preset 'wan2.2-t2v'; choose one of wan2.1-t2v-1.3b"
    ):
        WanDiTConfig.from_name("wan2.2-t2v")
    with pytest.raises(ValueError, match="not divisible"):
        WanDiTConfig(dim=100, ffn_dim=8, num_heads=3, num_layers=1)


def test_require_kind_names_the_file_and_what_to_use(tmp_path):
    model = _tiny_model(36)
    model.source = str(tmp_path / "TurboWan2.2-I2V-A14B-high-720P.pth")
    require_kind(model, "i2v")
    with pytest.raises(
        CheckpointError, match="'TurboWan2.2-I2V-A14B-high-720P.pth' holds a Wan2.2 I2V A14B expert"
    ):
        require_kind(model, "t2v")
    with pytest.raises(CheckpointError, match="text-to-video model.*needs the TurboWan2.2-I2V-A14B"):
        require_kind(_tiny_model(16), "i2v")


def test_load_dit_rejects_an_unknown_attention_backend(tmp_path):
    _write_tiny_turbodiffusion(tmp_path / "m.pth", 16)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        load_dit(tmp_path / "m.pth", attention="flash")


def test_loaded_model_is_frozen_and_knows_its_source(tmp_path):
    _write_tiny_turbodiffusion(tmp_path / "i2v.pth", 36)
    model = load_dit(tmp_path / "i2v.pth")
    assert model.kind == "i2v" and model.source == str(tmp_path / "i2v.pth")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
