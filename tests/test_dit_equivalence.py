"""load_dit + WanDiT against diffusers' WanTransformer3DModel, with the same random weights written in every
supported checkpoint layout (FORMATS.md §1, tiny config of §5, tolerances of §6)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from comfyui_turbodiffusion.wan_models.checkpoint_io import read_state_dict
from comfyui_turbodiffusion.wan_models.dit_loader import detect_dit_layout, load_dit
from comfyui_turbodiffusion.wan_models.linear_layers import Int8Linear
from dit_reference import (
    BLOCK_LINEARS,
    dequantize_tiles,
    diffusers_forward,
    from_original_layout,
    make_diffusers_model,
    make_inputs,
    to_original_layout,
    to_quant_layout,
    to_turbodiffusion_layout,
)
from safetensors.torch import save_file

FLOAT32_ATOL = 1e-4
LATENTS = ((2, 16, 3, 4, 4), (2, 16, 2, 4, 6))  # square and non-square token grids


@dataclass
class Reference:
    in_channels: int
    model: torch.nn.Module
    state: dict[str, torch.Tensor]
    inputs: list[tuple]
    outputs: list[torch.Tensor]
    folder: Path


def _reference(in_channels: int, folder: Path, state_override=None) -> Reference:
    model = make_diffusers_model(in_channels, seed=in_channels)
    if state_override is not None:
        model.load_state_dict(state_override)
    inputs = [make_inputs(in_channels, latent, seed=i) for i, latent in enumerate(LATENTS)]
    outputs = [diffusers_forward(model, *args) for args in inputs]
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    return Reference(in_channels, model, state, inputs, outputs, folder)


def _reference_from_original(folder: Path, original: dict[str, torch.Tensor]) -> Reference:
    keys = make_diffusers_model(16).state_dict().keys()
    return _reference(16, folder, from_original_layout(original, keys))


@pytest.fixture(scope="module", params=[16, 36], ids=["t2v", "i2v-in36"])
def reference(request, tmp_path_factory) -> Reference:
    return _reference(request.param, tmp_path_factory.mktemp(f"dit{request.param}"))


def _max_error(model, reference: Reference) -> float:
    errors = []
    for (x, t, context, y), expected in zip(reference.inputs, reference.outputs):
        with torch.no_grad():
            out = model(x, t, context, y)
        assert out.dtype == torch.float32 and out.shape == expected.shape
        errors.append((out - expected).abs().max().item())
    return max(errors)


def _write_turbodiffusion(ref: Reference) -> Path:
    path = ref.folder / "TurboWan-test.pth"
    torch.save(to_turbodiffusion_layout(to_original_layout(ref.state)), path)
    return path


def _write_turbodiffusion_training_artefact(ref: Reference) -> Path:
    """`net.` prefix and activation-checkpoint wrapper segments inside the block keys."""
    path = ref.folder / "dcp_export.pth"
    state = to_turbodiffusion_layout(to_original_layout(ref.state))
    wrapped = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index, rest = key[len("blocks.") :].split(".", 1)
            key = f"blocks.{index}._checkpoint_wrapped_module.{rest}"
        wrapped["net." + key] = value
    torch.save(wrapped, path)
    return path


def _write_original_single(ref: Reference) -> Path:
    path = ref.folder / "diffusion_pytorch_model.safetensors"
    save_file(to_original_layout(ref.state), path)
    return path


def _write_original_sharded(ref: Reference) -> Path:
    folder = ref.folder / "sharded"
    folder.mkdir(exist_ok=True)
    state = to_original_layout(ref.state)
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = keys[len(keys) // 2 :]
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({key: state[key] for key in shard_keys}, folder / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _write_comfyui_bare(ref: Reference) -> Path:
    path = ref.folder / "wan_comfy_fp32.safetensors"
    save_file(to_original_layout(ref.state), path, metadata={"format": "pt"})
    return path


def _write_comfyui_full_checkpoint(ref: Reference) -> Path:
    """The DiT under `model.diffusion_model.` beside other components, as in a full ComfyUI checkpoint."""
    path = ref.folder / "wan_comfy_checkpoint.safetensors"
    state = {"model.diffusion_model." + key: value for key, value in to_original_layout(ref.state).items()}
    state["first_stage_model.decoder.conv1.weight"] = torch.randn(4, 4)
    save_file(state, path)
    return path


def _write_diffusers_folder(ref: Reference) -> Path:
    folder = ref.folder / "transformer"
    ref.model.save_pretrained(folder)
    return folder


LAYOUTS = {
    "turbodiffusion-pth": (_write_turbodiffusion, "turbodiffusion"),
    "turbodiffusion-net-prefix": (_write_turbodiffusion_training_artefact, "turbodiffusion"),
    "original-single": (_write_original_single, "original"),
    "original-sharded": (_write_original_sharded, "original"),
    "comfyui-bare": (_write_comfyui_bare, "original"),  # same bytes as a Wan release file
    "comfyui-prefixed": (_write_comfyui_full_checkpoint, "comfyui"),
    "diffusers-folder": (_write_diffusers_folder, "diffusers"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_float32_layout_matches_diffusers(reference: Reference, layout: str):
    writer, family = LAYOUTS[layout]
    path = writer(reference)

    detected = detect_dit_layout(read_state_dict(path))
    model = load_dit(path)

    assert detected.family == family
    assert detected.kind == model.kind == ("i2v" if reference.in_channels == 36 else "t2v")
    assert model.compute_dtype == torch.float32
    assert _max_error(model, reference) <= FLOAT32_ATOL


def test_time_input_is_used_as_given(reference: Reference):
    """A 0.5 shift of t (e.g. rounding 250.5 inside the model) must move the output far beyond tolerance."""
    model = load_dit(_write_original_single(reference))
    x, t, context, y = reference.inputs[0]
    with torch.no_grad():
        shifted = model(x, t.round(), context, y)
    assert (shifted - reference.outputs[0]).abs().max().item() > 100 * FLOAT32_ATOL


def _fp16_family_file(ref: Reference, dtype: torch.dtype) -> Path:
    path = ref.folder / f"wan_{dtype}.safetensors".replace("torch.", "")
    save_file({key: value.to(dtype) for key, value in to_original_layout(ref.state).items()}, path)
    return path


@pytest.mark.parametrize(
    ("dtype", "relative_tolerance"),
    # bf16 keeps 8 mantissa bits (rel. step 2^-8 = 0.4 %), fp16 11 bits; errors accumulate over the blocks
    # and the attention (FORMATS.md §6: "bf16 runs need ~1e-2 relative").
    [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)],
)
def test_half_precision_comfyui_files_keep_their_dtype(tmp_path, dtype, relative_tolerance):
    rounded = {k: v.to(dtype).float() for k, v in make_diffusers_model(16, seed=16).state_dict().items()}
    reference = _reference(16, tmp_path, rounded)
    model = load_dit(_fp16_family_file(reference, dtype))

    assert model.compute_dtype == dtype
    assert model.blocks[0].ffn[0].weight.dtype == dtype
    assert model.blocks[0].self_attn.norm_q.weight.dtype == torch.float32
    scale = max(out.abs().max().item() for out in reference.outputs)
    assert _max_error(model, reference) <= relative_tolerance * scale


def _fp8_reference(tmp_path: Path, scaled: bool) -> tuple[Reference, dict[str, torch.Tensor]]:
    """Block linear weights stored as float8_e4m3fn (with a per-tensor scale when `scaled`); the reference
    model holds exactly the dequantised values fp8 x scale."""
    original = to_original_layout(make_diffusers_model(16, seed=8).state_dict())
    stored, dequantised = {}, {}
    for key, value in original.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.split(".", 2)[-1] in BLOCK_LINEARS:
            scale = value.abs().max() / 448 if scaled else torch.tensor(1.0)
            stored[key] = (value / scale).to(torch.float8_e4m3fn)
            dequantised[key] = stored[key].float() * scale
            if scaled:
                stored[module + ".scale_weight"] = scale.reshape(())
                stored[module + ".scale_input"] = torch.tensor(1.0)
        else:
            stored[key] = dequantised[key] = value
    if scaled:
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return _reference_from_original(tmp_path, dequantised), stored


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_comfyui_files_equal_the_dequantised_model(tmp_path, scaled):
    reference, stored = _fp8_reference(tmp_path, scaled)
    path = tmp_path / "wan_fp8.safetensors"
    save_file(stored, path)

    layout = detect_dit_layout(read_state_dict(path))
    exact = load_dit(path, dtype=torch.float32)
    default = load_dit(path)

    assert (layout.family, layout.fp8) == ("comfyui", True)
    # float32 compute on bit-identical dequantised weights: only summation order differs, as in the
    # float32 layout tests, so the same tolerance applies.
    assert _max_error(exact, reference) <= FLOAT32_ATOL
    assert default.compute_dtype == torch.bfloat16
    assert "blocks.0.self_attn.q.scale_weight" not in default.state_dict()
    scale = max(out.abs().max().item() for out in reference.outputs)
    assert _max_error(default, reference) <= 3e-2 * scale


def test_int8_quant_file_equals_dense_model_with_dequantised_weights(tmp_path):
    original = to_original_layout(make_diffusers_model(16, seed=3).state_dict())
    quant = to_quant_layout(to_turbodiffusion_layout(original))
    dequantised = {}
    for key, value in original.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module + ".int8_weight" in quant:
            dequantised[key] = dequantize_tiles(quant[module + ".int8_weight"], quant[module + ".scale"])
        else:
            dequantised[key] = value
    reference = _reference_from_original(tmp_path, dequantised)
    path = tmp_path / "TurboWan-test-quant.pth"
    torch.save(quant, path)

    model = load_dit(path)

    assert detect_dit_layout(quant).family == "turbodiffusion-quant"
    assert len(quant) == len(original) + 2 * 2 + 2 * 10  # 2 blocks: proj_l w/b and one scale per linear
    linear = model.blocks[1].ffn[2]
    assert isinstance(linear, Int8Linear) and linear.int8_weight.dtype == torch.int8
    assert torch.equal(linear.int8_weight, quant["blocks.1.ffn.2.int8_weight"])
    assert _max_error(model, reference) <= FLOAT32_ATOL


def test_released_style_bf16_quant_file_with_float32_norms(tmp_path):
    """bf16 tensors, float32 norm weights and int8 scales, as TurboDiffusion's conversion writes them."""
    original = to_original_layout(make_diffusers_model(16, seed=4).state_dict())
    quant = to_quant_layout(to_turbodiffusion_layout(original))
    released, effective = {}, {}
    for key, value in quant.items():
        keep_float32 = value.dtype == torch.int8 or key.endswith(".scale") or ".norm" in key
        released[key] = value if keep_float32 else value.to(torch.bfloat16)
    for key, value in original.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module + ".int8_weight" in quant:
            effective[key] = dequantize_tiles(quant[module + ".int8_weight"], quant[module + ".scale"])
        else:
            effective[key] = released[key].float().reshape(value.shape)
    reference = _reference_from_original(tmp_path, effective)
    path = tmp_path / "TurboWan-bf16-quant.pth"
    torch.save(released, path)

    model = load_dit(path)

    assert model.compute_dtype == torch.bfloat16
    assert model.blocks[0].norm3.weight.dtype == torch.float32
    assert model.blocks[0].self_attn.q.bias.dtype == torch.bfloat16
    assert model.blocks[0].self_attn.q.scale.dtype == torch.float32
    scale = max(out.abs().max().item() for out in reference.outputs)
    assert _max_error(model, reference) <= 3e-2 * scale
