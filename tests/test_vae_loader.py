"""load_vae / detect_vae_layout: layouts recognised by content, real-size key names and shapes (meta tensors),
prefixes and dtypes of ComfyUI files, and clear errors for files that are not the Wan 2.1 VAE."""

from __future__ import annotations

import math
import re

import pytest
import torch
from comfyui_turbodiffusion.wan_models import CheckpointError, load_vae
from comfyui_turbodiffusion.wan_models.vae import WanVAE
from comfyui_turbodiffusion.wan_models.vae_loader import detect_vae_layout, diffusers_to_original_key
from pipeline_torchvision import import_transforms_v2
from safetensors.torch import save_file
from vae_reference import diffusers_vae, random_original_state_dict

# TURBODIFFUSION.md sections 3.2 and 7.4: Wan2.1_VAE.pth holds 194 tensors, 126,892,531 elements.
REAL_KEY_COUNT = 194
REAL_ELEMENT_COUNT = 126_892_531
REAL_SHAPES = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.head.0.gamma": (96, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}


def _meta_state(module_factory) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return module_factory().state_dict()


def test_real_size_original_layout_from_meta_shapes():
    state = _meta_state(WanVAE)

    assert len(state) == REAL_KEY_COUNT
    assert sum(math.prod(t.shape) for t in state.values()) == REAL_ELEMENT_COUNT
    assert {key: tuple(state[key].shape) for key in REAL_SHAPES} == REAL_SHAPES
    assert {key for key in state if "shortcut" in key and key.startswith("decoder.")} == {
        "decoder.upsamples.4.shortcut.weight",
        "decoder.upsamples.4.shortcut.bias",
    }
    layout = detect_vae_layout(state)
    assert (layout.naming, layout.prefix, layout.base_dim) == ("original", "", 96)
    prefixed = detect_vae_layout({f"vae.{key}": value for key, value in state.items()})
    assert (prefixed.naming, prefixed.prefix, prefixed.base_dim) == ("original", "vae.", 96)


def test_real_size_diffusers_names_map_onto_the_original_ones():
    import_transforms_v2()
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    diffusers_state = _meta_state(AutoencoderKLWan)
    original_state = _meta_state(WanVAE)
    layout = detect_vae_layout(diffusers_state)
    mapped = {diffusers_to_original_key(key): value.shape for key, value in diffusers_state.items()}
    diffusers_names = convert_wan_vae_to_diffusers({key: key for key in original_state})

    assert (layout.naming, layout.prefix, layout.base_dim) == ("diffusers", "", 96)
    assert mapped == {key: value.shape for key, value in original_state.items()}
    assert all(diffusers_to_original_key(new) == old for new, old in diffusers_names.items())


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_original_state_dict(8, seed=11)


def test_diffusers_folder_loads_the_same_weights(state, tmp_path):
    diffusers_vae(state, 8).save_pretrained(tmp_path / "vae")

    vae = load_vae(tmp_path / "vae")

    assert vae.dtype == torch.float32 and vae.base_dim == 8
    assert all(torch.equal(vae.state_dict()[key], value) for key, value in state.items())


@pytest.mark.parametrize(
    ("prefix", "file_dtype"),
    [("", torch.float16), ("vae.", torch.bfloat16), ("first_stage_model.", torch.float16)],
)
def test_comfyui_files_load_in_their_dtype_from_any_prefix(state, tmp_path, prefix, file_dtype):
    bundle = {prefix + key: value.to(file_dtype) for key, value in state.items()}
    if prefix:  # a full checkpoint: the DiT and text encoder sit beside the VAE
        bundle["model.diffusion_model.blocks.0.self_attn.q.weight"] = torch.zeros(4, 4, dtype=file_dtype)
        bundle["text_encoders.umt5xxl.transformer.shared.weight"] = torch.zeros(4, 4, dtype=file_dtype)
    save_file(bundle, str(tmp_path / "vae.safetensors"))

    vae = load_vae(tmp_path / "vae.safetensors")
    as_float32 = load_vae(tmp_path / "vae.safetensors", dtype=torch.float32)

    assert vae.dtype == file_dtype and as_float32.dtype == torch.float32
    assert all(torch.equal(vae.state_dict()[key], value.to(file_dtype)) for key, value in state.items())
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def _save(tensors: dict[str, torch.Tensor], path) -> str:
    save_file({key: value.detach().clone().contiguous() for key, value in tensors.items()}, str(path))
    return str(path)


def _tiny_diffusers_dit() -> dict[str, torch.Tensor]:
    import_transforms_v2()
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
    )
    return model.state_dict()


def _tiny_umt5() -> dict[str, torch.Tensor]:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=32, d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1)
    return UMT5EncoderModel(config).state_dict()


def _tiny_wan22_vae() -> dict[str, torch.Tensor]:
    import_transforms_v2()
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
    )
    return model.state_dict()


def _original_dit() -> dict[str, torch.Tensor]:
    return {
        "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2),
        "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
    }


@pytest.mark.parametrize(
    ("make_state", "message"),
    [
        pytest.param(_original_dit, "Wan DiT", id="dit-original"),
        pytest.param(_tiny_diffusers_dit, "Wan DiT", id="dit-diffusers"),
        pytest.param(_tiny_umt5, "umT5 text encoder", id="umt5-transformers"),
        pytest.param(lambda: {"token_embedding.weight": torch.zeros(32, 8)}, "umT5 text encoder", id="umt5"),
        pytest.param(
            lambda: {"decoder.up.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3)},
            "another model",
            id="sd-vae",
        ),
        pytest.param(
            lambda: {"visual.conv1.weight": torch.zeros(4, 3, 2, 2)}, "CLIP image encoder", id="clip"
        ),
        pytest.param(_tiny_wan22_vae, "Wan 2.2 VAE", id="wan22-vae"),
        pytest.param(lambda: {"x.weight": torch.zeros(2)}, "first keys: x.weight", id="unknown"),
    ],
)
def test_files_that_are_not_the_wan21_vae_are_named(tmp_path, make_state, message):
    path = _save(make_state(), tmp_path / "not_a_vae.safetensors")

    with pytest.raises(CheckpointError, match=rf"^not_a_vae\.safetensors: .*{re.escape(message)}"):
        load_vae(path)


def test_wan22_vae_in_original_names_is_refused(state, tmp_path):
    wan22 = dict(state)
    wan22["decoder.upsamples.0.upsamples.0.residual.2.weight"] = torch.zeros(1)
    path = _save(wan22, tmp_path / "wan2.2_vae.safetensors")

    with pytest.raises(CheckpointError, match="Wan 2.2 VAE .*48 latent channels.*Wan2.1_VAE.pth"):
        load_vae(path)


def test_missing_unexpected_and_misshapen_tensors_are_listed(state, tmp_path):
    damaged = dict(state)
    del damaged["decoder.upsamples.4.shortcut.weight"]
    damaged["decoder.extra.weight"] = torch.zeros(3)
    damaged["encoder.conv1.weight"] = torch.zeros(8, 3, 3, 3)
    path = _save(damaged, tmp_path / "damaged.safetensors")

    with pytest.raises(CheckpointError) as error:
        load_vae(path)

    message = str(error.value)
    assert message.startswith("damaged.safetensors: looks like a Wan 2.1 VAE (original names, base width 8)")
    assert "1 missing keys, e.g. decoder.upsamples.4.shortcut.weight" in message
    assert "1 unexpected keys, e.g. decoder.extra.weight" in message
    assert "encoder.conv1.weight (8, 3, 3, 3) (expected (8, 3, 3, 3, 3))" in message
