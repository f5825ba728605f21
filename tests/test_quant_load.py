"""Quantise at load (`load_dit(linear_quant=...)`): a bf16 checkpoint becomes exactly the `-quant` format made
by the spec formula (TURBODIFFUSION.md §3.1, §11.1; formula in dit_reference.quantize_tiles_int8), or fp8;
conversions run one layer at a time; the converted models stay close to diffusers' output."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from comfyui_turbodiffusion.wan_models import quantize
from comfyui_turbodiffusion.wan_models.dit_loader import detect_dit_layout, load_dit
from comfyui_turbodiffusion.wan_models.linear_layers import Fp8Linear, Int8Linear
from dit_reference import (
    BLOCK_LINEARS,
    quantize_tiles_int8,
    write_tiny_release,
)
from quant_formulas import dequantize_tiles_f64, fp8_rows_quantize_f64, relative_l2
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """One random model as TurboDiffusion's release files: bf16 (float32 norms) and the -quant made from it
    by the spec formula, plus diffusers' float32 outputs of the same weights."""
    return write_tiny_release(tmp_path_factory.mktemp("release"), model_seed=21, input_seed=22)


def _relative_output_error(model, release) -> float:
    with torch.no_grad():
        out = model(*release["inputs"][:3])
    return relative_l2(out, release["expected"])


def test_int8_at_load_is_bit_exact_to_the_quant_file(release):
    folder = release["folder"]
    converted = load_dit(folder / "TurboWan-tiny.pth", linear_quant="int8")
    from_quant_file = load_dit(folder / "TurboWan-tiny-quant.pth")

    ours, theirs = converted.state_dict(), from_quant_file.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    for key, value in release["quant"].items():
        assert torch.equal(ours[key].to(value.dtype), value), key
    layer = converted.blocks[1].ffn[0]
    assert isinstance(layer, Int8Linear)
    assert (layer.int8_weight.dtype, layer.scale.dtype, layer.bias.dtype) == (
        torch.int8,
        torch.float32,
        torch.bfloat16,
    )
    assert detect_dit_layout(ours).family == "turbodiffusion-quant"


def test_int8_at_load_from_an_original_safetensors_file(tmp_path, release):
    """Original Wan layout (5-D patch embedding, safetensors, no SLA): the same formula per block linear."""
    original = {
        key: value
        for key, value in release["bf16"].items()
        if ".proj_l." not in key and key != "patch_embedding.weight"
    }
    original["patch_embedding.weight"] = release["bf16"]["patch_embedding.weight"].reshape(-1, 16, 1, 2, 2)
    save_file(original, tmp_path / "diffusion_pytorch_model.safetensors")

    model = load_dit(tmp_path / "diffusion_pytorch_model.safetensors", linear_quant="int8")

    state = model.state_dict()
    for index in range(2):
        for linear in BLOCK_LINEARS:
            name = f"blocks.{index}.{linear}"
            codes, scale = quantize_tiles_int8(original[name + ".weight"])
            assert torch.equal(state[name + ".int8_weight"], codes)
            assert torch.equal(state[name + ".scale"], scale)
    assert _relative_output_error(model, release) < 1.5e-2


def test_auto_keeps_the_stored_format_and_none_dequantises(release):
    folder = release["folder"]
    dense = load_dit(folder / "TurboWan-tiny.pth")
    assert isinstance(dense.blocks[0].self_attn.q, torch.nn.Linear)

    dequantised = load_dit(folder / "TurboWan-tiny-quant.pth", linear_quant="none", dtype=torch.float32)
    q = dequantised.blocks[0].self_attn.q
    assert isinstance(q, torch.nn.Linear) and q.weight.dtype == torch.float32
    expected = dequantize_tiles_f64(
        release["quant"]["blocks.0.self_attn.q.int8_weight"], release["quant"]["blocks.0.self_attn.q.scale"]
    )
    assert torch.equal(q.weight.double(), expected)


def test_fp8_at_load(release):
    model = load_dit(release["folder"] / "TurboWan-tiny.pth", linear_quant="fp8")

    layer = model.blocks[0].ffn[2]
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    codes, scale = fp8_rows_quantize_f64(release["bf16"]["blocks.0.ffn.2.weight"])
    assert torch.equal(layer.weight.double(), codes)
    assert torch.equal(layer.weight_scale.double(), scale)
    assert layer.bias.dtype == torch.bfloat16
    assert _relative_output_error(model, release) < 3e-2


def test_quant_file_to_fp8_and_w8a8_accuracy(release):
    folder = release["folder"]
    int8 = load_dit(folder / "TurboWan-tiny-quant.pth")
    fp8 = load_dit(folder / "TurboWan-tiny-quant.pth", linear_quant="fp8")
    assert isinstance(fp8.blocks[1].cross_attn.o, Fp8Linear)
    # Measured rel-L2 against diffusers in float32: bf16 dense 0.005, int8 W8A8 0.009, fp8 0.019.
    assert _relative_output_error(int8, release) < 1.5e-2
    assert _relative_output_error(fp8, release) < 3e-2


def test_in_place_model_quantisation_equals_quantise_at_load(release):
    folder = release["folder"]
    model = load_dit(folder / "TurboWan-tiny.pth")
    quantize.quantize_model_linears_(model, "int8")
    expected = load_dit(folder / "TurboWan-tiny.pth", linear_quant="int8").state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    assert isinstance(model.blocks[0].self_attn.attn_op.local_attn.proj_l, torch.nn.Linear)


def test_conversion_frees_each_layer_before_the_next(monkeypatch):
    """Peak memory: when layer k is converted, the dense originals of layers < k are gone already."""
    names = [f"blocks.{i}.ffn.0" for i in range(4)]
    weights = {f"{name}.weight": torch.randn(256, 256) for name in names}
    weights.update({f"{name}.bias": torch.randn(256) for name in names})
    originals = [weakref.ref(weights[f"{name}.weight"]) for name in names]
    alive_at_each_call = []
    quantise = quantize.quantize_tiles

    def counting(dense):
        alive_at_each_call.append(sum(ref() is not None for ref in originals))
        return quantise(dense)

    monkeypatch.setattr(quantize, "quantize_tiles", counting)
    quantize.convert_linear_weights_(
        weights, names, "dense", "int8", torch.device("cpu"), torch.device("cpu")
    )

    assert alive_at_each_call == [4, 3, 2, 1]
    assert all(ref() is None for ref in originals)
    assert sorted(weights) == sorted(f"{n}.{k}" for n in names for k in ("int8_weight", "scale", "bias"))


def test_bad_option_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match="linear_quant must be one of"):
        load_dit(tmp_path / "missing.pth", linear_quant="int4")


def _comfy_fp8_file(tmp_path, release) -> tuple[Path, dict[str, torch.Tensor]]:
    """ComfyUI's legacy scaled-fp8 layout (FORMATS.md §1.6) under the full-checkpoint prefix: e4m3 block
    linears with a per-tensor `scale_weight`, everything else bf16."""
    prefix = "model.diffusion_model."
    stored = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in release["bf16"].items():
        if ".proj_l." in key:
            continue
        if key == "patch_embedding.weight":
            value = value.reshape(-1, 16, 1, 2, 2)
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.split(".", 2)[-1] in BLOCK_LINEARS:
            scale = value.float().abs().max() / 448
            stored[prefix + key] = (value.float() / scale).to(torch.float8_e4m3fn)
            stored[prefix + module + ".scale_weight"] = scale
        else:
            stored[prefix + key] = value
    path = tmp_path / "wan2.1_t2v_tiny_fp8_scaled.safetensors"
    save_file(stored, path)
    return path, stored


def test_comfy_fp8_file_stays_fp8_and_computes_as_comfyui(tmp_path, release):
    path, stored = _comfy_fp8_file(tmp_path, release)

    kept = load_dit(path, dtype=torch.float32)
    dense = load_dit(path, dtype=torch.float32, linear_quant="none")

    layer = kept.blocks[1].cross_attn.k
    key = "model.diffusion_model.blocks.1.cross_attn.k"
    assert isinstance(layer, Fp8Linear) and layer.activations == "weight_only"
    assert torch.equal(layer.weight.view(torch.uint8), stored[key + ".weight"].view(torch.uint8))
    assert torch.equal(layer.weight_scale, stored[key + ".scale_weight"].expand(256))
    assert isinstance(dense.blocks[1].cross_attn.k, torch.nn.Linear)
    with torch.no_grad():
        inputs = release["inputs"][:3]
        assert torch.allclose(kept(*inputs), dense(*inputs), atol=1e-5)
    kept_bytes = sum(t.numel() * t.element_size() for t in kept.state_dict().values())
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    assert kept_bytes < 0.6 * dense_bytes


def test_fp8_option_on_an_fp8_file_keeps_the_codes_and_runs_w8a8(tmp_path, release):
    path, stored = _comfy_fp8_file(tmp_path, release)
    model = load_dit(path, linear_quant="fp8")
    layer = model.blocks[0].ffn[0]
    assert layer.activations == "auto" and model.compute_dtype == torch.bfloat16
    key = "model.diffusion_model.blocks.0.ffn.0.weight"
    assert torch.equal(layer.weight.view(torch.uint8), stored[key].view(torch.uint8))
    assert _relative_output_error(model, release) < 3e-2


def test_fp8_files_with_other_block_linear_storage_are_dequantised_whole():
    e4m3 = torch.ones(4, 4).to(torch.float8_e4m3fn)
    state = {
        "blocks.0.ffn.0.weight": e4m3,
        "blocks.0.ffn.0.scale_weight": torch.tensor(0.5),
        "blocks.0.ffn.2.weight": e4m3,
        "blocks.0.ffn.0.bias": torch.zeros(4),
    }
    rest, kept = quantize.split_stored_fp8_linears(state)
    assert set(kept.codes) == {"blocks.0.ffn.0.weight", "blocks.0.ffn.2.weight"}
    assert kept.scales["blocks.0.ffn.0.weight"].item() == 0.5 and kept.scales["blocks.0.ffn.2.weight"] == 1
    assert set(rest) == {"blocks.0.ffn.0.bias"}

    for changed in (
        {"blocks.0.ffn.2.weight": torch.ones(4, 4, dtype=torch.bfloat16)},
        {"blocks.0.ffn.2.weight": torch.ones(4, 4).to(torch.float8_e5m2)},
        {"blocks.0.ffn.0.scale_weight": torch.ones(4)},
    ):
        rest, kept = quantize.split_stored_fp8_linears({**state, **changed})
        assert not kept.codes and rest.keys() == {**state, **changed}.keys()
