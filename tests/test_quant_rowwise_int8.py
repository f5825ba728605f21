"""Opt-in int8 row-wise storage (`linear_quant="int8_rowwise"`, KERNELS.md §4.6 "fast path"): the layer's CPU
path equals the spec formula, the GELU seam hands it `gelu=True` where its GEMM applies it, loading from a
bf16 checkpoint quantises each weight row by the formula, loading from a `-quant` file re-quantises the tiles
per row (and refuses a layer that loses too much, naming it), block swap and state-dict round trips keep the
outputs bit for bit, and the loader node offers the choice."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from comfyui_turbodiffusion.wan_models import linear_kernels
from comfyui_turbodiffusion.wan_models.block_ops import make_block_ops
from comfyui_turbodiffusion.wan_models.block_swap import enable_block_swap
from comfyui_turbodiffusion.wan_models.checkpoint_io import CheckpointError
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import WanDiT
from comfyui_turbodiffusion.wan_models.dit_loader import dit_from_state_dict, load_dit
from comfyui_turbodiffusion.wan_models.linear_layers import Int8Linear, Int8RowwiseLinear
from comfyui_turbodiffusion.wan_models.quantize import quantize_model_linears_
from dit_reference import (
    BLOCK_LINEARS,
    make_inputs,
    randomise_,
    write_tiny_release,
)
from quant_formulas import relative_l2
from rowwise_formulas import (
    assert_within_one_bf16_ulp,
    int8_rows_quantize_f64,
    rows_from_tiles_f64,
    rowwise_gemm_f64,
)


def _layer(depth=256, columns=96, seed=0) -> tuple[Int8RowwiseLinear, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    layer = Int8RowwiseLinear(depth, columns, bias_dtype=torch.bfloat16)
    layer.weight.copy_(torch.randint(-127, 128, (columns, depth), generator=generator))
    layer.weight_scale.copy_(torch.rand(columns, generator=generator) * 1e-3 + 1e-4)
    layer.bias.copy_(torch.randn(columns, generator=generator))
    x = (torch.randn(3, 41, depth, generator=generator) * torch.linspace(0.2, 3, depth)).to(torch.bfloat16)
    return layer, x


def _formula(layer: Int8RowwiseLinear, x: torch.Tensor, gelu: bool) -> torch.Tensor:
    """Per-token int8 codes by the spec quantiser, Σ codes exact (float64 integers), then the kernel's
    epilogue in float32: × s_x[m] × s_w[n] + b (GELU-tanh), one rounding to bf16."""
    codes, scale = int8_rows_quantize_f64(x.reshape(-1, x.shape[-1]))
    exact_sum = codes @ layer.weight.double().T
    value = exact_sum.float() * scale.float()[:, None] * layer.weight_scale[None, :] + layer.bias.float()
    value = F.gelu(value, approximate="tanh") if gelu else value
    return value.to(torch.bfloat16).reshape(*x.shape[:-1], layer.out_features)


def test_cpu_path_equals_the_formula():
    layer, x = _layer()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _formula(layer, x, gelu=False))
    codes, scale = int8_rows_quantize_f64(x.reshape(-1, x.shape[-1]))
    exact, magnitude = rowwise_gemm_f64(
        codes.to(torch.int8), scale.float(), layer.weight, layer.weight_scale, layer.bias, gelu=False
    )
    assert_within_one_bf16_ulp(out.reshape(-1, layer.out_features), exact, magnitude)


def test_float32_inputs_use_the_dequantised_weight():
    layer, x = _layer()
    x32 = x.float()
    dense = layer.weight.double() * layer.weight_scale.double()[:, None]
    expected = x32.double() @ dense.T + layer.bias.double()
    assert torch.allclose(layer(x32).double(), expected, atol=1e-4, rtol=1e-5)


def test_the_gelu_seam_routes_gelu_into_the_rowwise_gemm(monkeypatch):
    layer, x = _layer()
    assert not layer.fuses_gelu(x)  # the CPU keeps the separate GELU
    assert torch.equal(make_block_ops("auto").linear_gelu(layer, x), F.gelu(layer(x), approximate="tanh"))

    monkeypatch.setattr(linear_kernels, "int8_rowwise_fuses_gelu", lambda device, dtype: True)
    out = make_block_ops("auto").linear_gelu(layer, x)
    assert torch.equal(out, _formula(layer, x, gelu=True))
    assert not torch.equal(out, F.gelu(layer(x), approximate="tanh"))


@pytest.mark.parametrize(
    ("capability", "triton", "path"),
    [
        ((9, 0), (3, 9), "triton"),
        ((8, 0), (3, 4), "triton"),
        ((9, 0), (3, 3), "reference"),
        (None, None, "reference"),
    ],
)
def test_int8_rowwise_plan(capability, triton, path):
    device = torch.device("cuda" if capability else "cpu")
    assert linear_kernels.plan_int8_rowwise(device, triton, capability).path == path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random tiny model as TurboDiffusion's bf16 .pth and the -quant .pth made from it (spec formula)."""
    return write_tiny_release(tmp_path_factory.mktemp("rowwise"), model_seed=31, input_seed=32)


def _output_error(model, release) -> float:
    with torch.no_grad():
        return relative_l2(model(*release["inputs"][:3]), release["expected"])


def test_from_a_bf16_checkpoint(release):
    model = load_dit(release["folder"] / "TurboWan-tiny.pth", linear_quant="int8_rowwise")
    state = model.state_dict()
    for index in range(2):
        for linear in BLOCK_LINEARS:
            name = f"blocks.{index}.{linear}"
            assert isinstance(model.get_submodule(name), Int8RowwiseLinear)
            codes, scale = int8_rows_quantize_f64(release["bf16"][name + ".weight"])
            assert torch.equal(state[name + ".weight"].double(), codes), name
            assert torch.equal(state[name + ".weight_scale"].double(), scale), name
            assert state[name + ".bias"].dtype == torch.bfloat16
    assert isinstance(model.blocks[0].self_attn.attn_op.local_attn.proj_l, torch.nn.Linear)
    # int8 -quant W8A8 measures 0.009 against diffusers here; one scale per row and token is of that order.
    assert _output_error(model, release) < 1.5e-2

    in_memory = dit_from_state_dict(release["bf16"], linear_quant="int8_rowwise").state_dict()
    assert all(torch.equal(in_memory[key], state[key]) for key in state)


def test_from_a_quant_checkpoint(release, caplog):
    with caplog.at_level(logging.INFO, logger="comfyui_turbodiffusion.wan_models.quantize"):
        model = load_dit(release["folder"] / "TurboWan-tiny-quant.pth", linear_quant="int8_rowwise")
    assert "worst 128x128 tile error" in caplog.text
    layer = model.blocks[1].ffn[0]
    assert isinstance(layer, Int8RowwiseLinear)
    quant = release["quant"]
    codes, scale = rows_from_tiles_f64(quant["blocks.1.ffn.0.int8_weight"], quant["blocks.1.ffn.0.scale"])
    assert torch.equal(layer.weight.double(), codes) and torch.equal(layer.weight_scale.double(), scale)
    assert _output_error(model, release) < 1.5e-2
    assert isinstance(load_dit(release["folder"] / "TurboWan-tiny-quant.pth").blocks[1].ffn[0], Int8Linear)


def test_a_layer_that_loses_too_much_is_refused_by_name(release, tmp_path):
    quant = dict(release["quant"])
    scale = quant["blocks.1.cross_attn.v.scale"].clone()
    scale[0, 0] *= 1000.0  # one tile 1000x larger sets its rows' scales: the other tiles round to ~nothing
    quant["blocks.1.cross_attn.v.scale"] = scale
    torch.save(quant, tmp_path / "TurboWan-tiny-quant.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.cross_attn\.v: .*limit is 0\.05"):
        load_dit(tmp_path / "TurboWan-tiny-quant.pth", linear_quant="int8_rowwise")


def _sdpa(q, k, v, proj_l=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _tiny_rowwise_model(seed: int) -> WanDiT:
    config = WanDiTConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=4, text_dim=64)
    model = WanDiT(config, self_attention=_sdpa, cross_attention=_sdpa)
    randomise_(model, seed)
    model = model.to(torch.bfloat16).eval()
    quantize_model_linears_(model, "int8_rowwise")
    return model


def _forward(model):
    x, t, context, _ = make_inputs(16, latent=(1, 16, 3, 4, 6), seed=5)
    with torch.no_grad():
        return model(x, t, context)


def test_state_dict_round_trip():
    model, other = _tiny_rowwise_model(1), _tiny_rowwise_model(2)
    assert isinstance(model.blocks[2].ffn[2], Int8RowwiseLinear)
    other.load_state_dict(model.state_dict())
    assert torch.equal(_forward(other), _forward(model))
    assert other.blocks[0].self_attn.q.weight.dtype == torch.int8


def test_block_swap_moves_the_rowwise_buffers():
    model = _tiny_rowwise_model(3)
    expected = _forward(model)
    swap = enable_block_swap(model, 2)
    assert torch.equal(_forward(model), expected)
    slot = model.block_swap_slots[0].self_attn.q
    assert isinstance(slot, Int8RowwiseLinear) and slot.weight.dtype == torch.int8
    swap.remove()
    assert torch.equal(_forward(model), expected)


def test_loader_node_offers_int8_rowwise():
    from comfy_inprocess import import_comfy_and_nodes

    import_comfy_and_nodes()
    from comfyui_turbodiffusion.nodes.loader_nodes import TD_WanModelLoader

    choices, options = TD_WanModelLoader.INPUT_TYPES()["optional"]["linear_quant"]
    assert choices == ["auto", "none", "int8", "fp8", "int8_rowwise"] and options["default"] == "auto"
    assert "int8_rowwise" in options["tooltip"] and "-quant" in options["tooltip"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gelu", [False, True])
def test_triton_int8_rowwise_on_gpu_matches_the_float64_formula(gelu):
    device = torch.device("cuda", torch.cuda.current_device())
    if linear_kernels._int8_rowwise_path(device) != "triton":
        pytest.skip("the Triton row-wise GEMM does not run int8 on this GPU")
    layer, x = _layer(depth=1536, columns=8960 if gelu else 1536)
    layer, x = layer.to(device), x.reshape(-1, 1536).repeat(5, 1).to(device)
    assert layer.fuses_gelu(x) and layer.weight.dtype == torch.int8
    out = make_block_ops("auto").linear_gelu(layer, x) if gelu else layer(x)
    codes, scale = int8_rows_quantize_f64(x.cpu())
    layer = layer.cpu()
    exact, magnitude = rowwise_gemm_f64(
        codes.to(torch.int8), scale.float(), layer.weight, layer.weight_scale, layer.bias, gelu
    )
    assert_within_one_bf16_ulp(out.cpu(), exact, magnitude)
