"""ComfyUI fp8 formats (FORMATS.md §1.6) dequantised to plain tensors, checked against the stated formulas."""

import json

import pytest
import torch
from comfyui_turbodiffusion.wan_models.checkpoint_io import CheckpointError
from comfyui_turbodiffusion.wan_models.fp8_formats import dequantize_comfy_fp8, has_comfy_fp8


def _fp8_weight(seed: int, shape=(8, 16), dtype=torch.float8_e4m3fn) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 3).to(dtype)


def _json_bytes(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def test_plain_fp8_keeps_stored_values_and_leaves_other_tensors_alone():
    weight = _fp8_weight(0)
    weight_e5m2 = _fp8_weight(1, dtype=torch.float8_e5m2)
    bias = torch.randn(8, dtype=torch.float32)
    blob = torch.arange(10, dtype=torch.uint8)
    state = {"a.weight": weight, "b.weight": weight_e5m2, "a.bias": bias, "spiece_model": blob}
    assert has_comfy_fp8(state)

    out = dequantize_comfy_fp8(state, {}, torch.bfloat16)

    assert out["a.weight"].dtype == torch.bfloat16
    assert torch.equal(out["a.weight"], weight.float().to(torch.bfloat16))
    assert torch.equal(out["b.weight"], weight_e5m2.float().to(torch.bfloat16))
    assert out["a.bias"] is bias
    assert out["spiece_model"] is blob


def test_legacy_scaled_fp8_multiplies_by_scale_weight_and_drops_markers():
    weight = _fp8_weight(2)
    p = "model.diffusion_model."
    bias = torch.randn(8, dtype=torch.float16)
    state = {
        p + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        p + "x.weight": weight,
        p + "x.scale_weight": torch.tensor(0.037, dtype=torch.float32),
        p + "x.scale_input": torch.tensor(1.0, dtype=torch.float32),
        p + "x.bias": bias,
        p + "y.weight": torch.randn(4, 4),
    }
    out = dequantize_comfy_fp8(state, None, torch.float32)

    assert set(out) == {p + "x.weight", p + "x.bias", p + "y.weight"}
    expected = weight.to(torch.float32) * 0.037
    assert torch.equal(out[p + "x.weight"], expected)
    assert out[p + "x.bias"].dtype == torch.float16
    assert torch.equal(out[p + "y.weight"], state[p + "y.weight"])


def test_unscaled_marker_file_is_recognised_without_fp8_tensors():
    assert has_comfy_fp8({"scaled_fp8": torch.empty(2), "w.weight": torch.randn(2, 2)})
    assert not has_comfy_fp8({"w.weight": torch.randn(2, 2, dtype=torch.bfloat16)})


def test_current_format_with_comfy_quant_tensor():
    weight = _fp8_weight(3)
    state = {
        "blk.weight": weight,
        "blk.weight_scale": torch.tensor([0.5], dtype=torch.float32),
        "blk.input_scale": torch.tensor(1.0),
        "blk.comfy_quant": _json_bytes({"format": "float8_e4m3fn"}),
        "blk.bias": torch.randn(8, dtype=torch.bfloat16),
    }
    out = dequantize_comfy_fp8(state, {}, torch.bfloat16)
    assert set(out) == {"blk.weight", "blk.bias"}
    assert torch.equal(out["blk.weight"], (weight.float() * 0.5).to(torch.bfloat16))


def test_current_format_described_by_file_metadata():
    weight = _fp8_weight(4)
    metadata = {"_quantization_metadata": json.dumps({"layers": {"blk": {"format": "float8_e4m3fn"}}})}
    state = {"blk.weight": weight, "blk.weight_scale": torch.tensor(2.0)}
    assert has_comfy_fp8({"blk.weight": torch.randn(2)}, metadata)
    out = dequantize_comfy_fp8(state, metadata, torch.float32)
    assert torch.equal(out["blk.weight"], weight.float() * 2.0)


def test_unsupported_quantisation_formats_are_refused_with_the_layer_name():
    metadata = {"_quantization_metadata": json.dumps({"layers": {"blk": {"format": "nvfp4"}}})}
    with pytest.raises(CheckpointError, match="'blk'.*'nvfp4'"):
        dequantize_comfy_fp8({"blk.weight": torch.zeros(2, dtype=torch.uint8)}, metadata, torch.float32)
    nvfp4 = {"blk.weight": torch.zeros(2, dtype=torch.uint8), "blk.weight_scale_2": torch.tensor(1.0)}
    with pytest.raises(CheckpointError, match="NVFP4"):
        dequantize_comfy_fp8(nvfp4, None, torch.float32)
    with pytest.raises(CheckpointError, match="JSON"):
        dequantize_comfy_fp8({"_": torch.zeros(1)}, {"_quantization_metadata": "not json"}, torch.float32)


def test_blockwise_scales_are_refused():
    state = {"blk.weight": _fp8_weight(5), "blk.weight_scale": torch.ones(8)}
    with pytest.raises(CheckpointError, match="per-tensor"):
        dequantize_comfy_fp8(state, None, torch.float32)
