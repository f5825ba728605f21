"""Layout and config detection from real-size key sets and shapes on the meta device (nothing allocated).

The key templates are written here from TURBODIFFUSION.md §3.1/§3.4 and FORMATS.md §1.2, with the key counts
and parameter totals the spec states for the released files."""

from __future__ import annotations

import math

import pytest
import torch
from comfyui_turbodiffusion.wan_models.attention import sdpa_attention
from comfyui_turbodiffusion.wan_models.checkpoint_io import CheckpointError
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig, config_from_state_dict
from comfyui_turbodiffusion.wan_models.dit import WanDiT
from comfyui_turbodiffusion.wan_models.dit_loader import detect_dit_layout
from comfyui_turbodiffusion.wan_models.linear_layers import int8_linear_factory
from dit_reference import BLOCK_LINEARS, BLOCK_NAMES, TOP_LEVEL_NAMES

SIZES = {  # preset: (dim, ffn_dim, layers, in_dim)
    "wan2.1-t2v-1.3b": (1536, 8960, 30, 16),
    "wan2.1-t2v-14b": (5120, 13824, 40, 16),
    "wan2.2-i2v-a14b": (5120, 13824, 40, 36),
}


def _meta(shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def wan_release_state(dim, ffn, layers, in_dim, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Upstream Wan key set (TURBODIFFUSION.md §3.2, §3.4), 5-D patch embedding."""
    state = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, 4096),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, 256),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
        "head.modulation": (1, 2, dim),
        "head.head.weight": (64, dim),
        "head.head.bias": (64,),
    }
    for n in range(layers):
        p = f"blocks.{n}."
        state[p + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for linear in "qkvo":
                state[f"{p}{attn}.{linear}.weight"] = (dim, dim)
                state[f"{p}{attn}.{linear}.bias"] = (dim,)
            state[f"{p}{attn}.norm_q.weight"] = (dim,)
            state[f"{p}{attn}.norm_k.weight"] = (dim,)
        state[p + "norm3.weight"] = state[p + "norm3.bias"] = (dim,)
        state[p + "ffn.0.weight"], state[p + "ffn.0.bias"] = (ffn, dim), (ffn,)
        state[p + "ffn.2.weight"], state[p + "ffn.2.bias"] = (dim, ffn), (dim,)
    return {key: _meta(shape, dtype) for key, shape in state.items()}


def turbodiffusion_state(dim, ffn, layers, in_dim, quant: bool) -> dict[str, torch.Tensor]:
    """Release .pth: bf16, float32 norms, 2-D patch embedding, SLA proj_l; -quant: int8 block linears."""
    state = {}
    for key, tensor in wan_release_state(dim, ffn, layers, in_dim).items():
        dtype = torch.float32 if ".norm" in key else torch.bfloat16
        state[key] = _meta(tensor.shape, dtype)
    state["patch_embedding.weight"] = _meta((dim, in_dim * 4))
    for n in range(layers):
        state[f"blocks.{n}.self_attn.attn_op.local_attn.proj_l.weight"] = _meta((128, 128))
        state[f"blocks.{n}.self_attn.attn_op.local_attn.proj_l.bias"] = _meta((128,))
        if quant:
            for linear in BLOCK_LINEARS:
                weight = state.pop(f"blocks.{n}.{linear}.weight")
                rows, columns = weight.shape
                state[f"blocks.{n}.{linear}.int8_weight"] = _meta((rows, columns), torch.int8)
                tiles = (math.ceil(rows / 128), math.ceil(columns / 128))
                state[f"blocks.{n}.{linear}.scale"] = _meta(tiles, torch.float32)
    return state


def diffusers_state(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    to_diffusers_top = {v: k for k, v in TOP_LEVEL_NAMES.items()}
    to_diffusers_block = {v: k for k, v in BLOCK_NAMES.items()}
    state = {}
    for key, tensor in original.items():
        module, parameter = key.rsplit(".", 1)
        if key == "head.modulation":
            state["scale_shift_table"] = tensor
        elif key.endswith(".modulation"):
            state[key.replace("modulation", "scale_shift_table")] = tensor
        elif key.startswith("blocks."):
            _, index, rest = module.split(".", 2)
            state[f"blocks.{index}.{to_diffusers_block[rest]}.{parameter}"] = tensor
        else:
            state[f"{to_diffusers_top[module]}.{parameter}"] = tensor
    return state


RELEASED_FILES = [
    # (file, preset, quant, key count from TURBODIFFUSION.md §3.1)
    ("TurboWan2.1-T2V-1.3B-480P.pth", "wan2.1-t2v-1.3b", False, 885),
    ("TurboWan2.1-T2V-1.3B-480P-quant.pth", "wan2.1-t2v-1.3b", True, 1185),
    ("TurboWan2.1-T2V-14B-720P.pth", "wan2.1-t2v-14b", False, 1175),
    ("TurboWan2.1-T2V-14B-720P-quant.pth", "wan2.1-t2v-14b", True, 1575),
    ("TurboWan2.2-I2V-A14B-high-720P.pth", "wan2.2-i2v-a14b", False, 1175),
    ("TurboWan2.2-I2V-A14B-low-720P-quant.pth", "wan2.2-i2v-a14b", True, 1575),
]


@pytest.mark.parametrize(
    ("file", "preset", "quant", "count"), RELEASED_FILES, ids=[r[0] for r in RELEASED_FILES]
)
def test_released_turbodiffusion_files_are_detected(file, preset, quant, count):
    state = turbodiffusion_state(*SIZES[preset], quant=quant)
    assert len(state) == count and all(tensor.is_meta for tensor in state.values())

    layout = detect_dit_layout(state)

    assert layout.family == ("turbodiffusion-quant" if quant else "turbodiffusion")
    assert layout.config == WanDiTConfig.from_name(preset, has_sla_proj=True)
    assert (layout.quantized, layout.sla, layout.fp8, layout.prefix) == (quant, True, False, "")
    assert layout.kind == ("i2v" if preset.startswith("wan2.2") else "t2v")


@pytest.mark.parametrize(
    ("file", "preset", "quant", "count"), RELEASED_FILES, ids=[r[0] for r in RELEASED_FILES]
)
def test_model_built_for_a_released_file_has_exactly_its_keys_and_shapes(file, preset, quant, count):
    state = turbodiffusion_state(*SIZES[preset], quant=quant)
    config = WanDiTConfig.from_name(preset, has_sla_proj=True)
    factory = int8_linear_factory() if quant else torch.nn.Linear
    with torch.device("meta"):
        model = WanDiT(
            config, self_attention=sdpa_attention, cross_attention=sdpa_attention, linear_factory=factory
        )
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert expected == {key: tuple(tensor.shape) for key, tensor in state.items()}


@pytest.mark.parametrize(
    ("preset", "parameters"),
    # TURBODIFFUSION.md §1.1 "params (no SLA)"; SLA adds 16,512 per block.
    [
        ("wan2.1-t2v-1.3b", 1_418_996_800),
        ("wan2.1-t2v-14b", 14_288_491_584),
        ("wan2.2-i2v-a14b", 14_288_901_184),
    ],
)
def test_preset_parameter_counts(preset, parameters):
    config = WanDiTConfig.from_name(preset)
    with torch.device("meta"):
        plain = WanDiT(config, self_attention=sdpa_attention, cross_attention=sdpa_attention)
        sla = WanDiT(
            WanDiTConfig.from_name(preset, has_sla_proj=True),
            self_attention=sdpa_attention,
            cross_attention=sdpa_attention,
        )
    assert sum(p.numel() for p in plain.parameters()) == parameters
    assert sum(p.numel() for p in sla.parameters()) == parameters + 16_512 * config.num_layers


@pytest.mark.parametrize("preset", list(SIZES))
def test_wan_release_comfyui_and_diffusers_layouts(preset):
    original = wan_release_state(*SIZES[preset])
    expected_config = WanDiTConfig.from_name(preset)
    assert len(original) == (825 if preset == "wan2.1-t2v-1.3b" else 1095)

    fp8 = {
        k: _meta(v.shape, torch.float8_e4m3fn if v.dim() == 2 else torch.bfloat16)
        for k, v in original.items()
    }
    scaled = dict(fp8, scaled_fp8=_meta((0,), torch.float8_e4m3fn))
    scaled.update(
        {k.replace(".weight", ".scale_weight"): _meta((), torch.float32) for k in fp8 if ".ffn." in k}
    )
    cases = {
        "original": (original, "original", "", False),
        "comfyui-checkpoint": (
            {"model.diffusion_model." + k: v for k, v in original.items()},
            "comfyui",
            None,
            False,
        ),
        "comfyui-fp8": (fp8, "comfyui", "", True),
        "comfyui-fp8-scaled": (scaled, "comfyui", "", True),
        "diffusers": (diffusers_state(original), "diffusers", "", False),
    }
    for name, (state, family, prefix, is_fp8) in cases.items():
        layout = detect_dit_layout(state)
        assert layout.family == family, name
        assert layout.config == expected_config, name
        assert layout.fp8 == is_fp8 and not layout.quantized and not layout.sla, name
        assert layout.prefix == ("model.diffusion_model." if prefix is None else prefix), name


def test_training_artefact_prefix_and_wrapper_segments_are_stripped():
    state = turbodiffusion_state(*SIZES["wan2.1-t2v-1.3b"], quant=False)
    wrapped = {
        "net." + k.replace("self_attn.", "_checkpoint_wrapped_module.self_attn."): v for k, v in state.items()
    }
    layout = detect_dit_layout(wrapped)
    assert (layout.family, layout.prefix) == ("turbodiffusion", "net.")


def test_config_from_state_dict_reads_shapes_only():
    state = turbodiffusion_state(*SIZES["wan2.1-t2v-1.3b"], quant=True)
    assert config_from_state_dict(state) == WanDiTConfig.from_name("wan2.1-t2v-1.3b", has_sla_proj=True)


def test_wan21_i2v_with_clip_branch_is_refused():
    state = wan_release_state(1536, 8960, 2, 36)
    state["img_emb.proj.1.weight"] = _meta((1280, 1280))
    state["blocks.0.cross_attn.k_img.weight"] = _meta((1536, 1536))
    with pytest.raises(CheckpointError, match="Wan2.1 I2V model with a CLIP image branch"):
        detect_dit_layout(state)
    state["img_emb.emb_pos"] = _meta((1, 514, 1280))
    with pytest.raises(CheckpointError, match="Wan2.1 I2V FLF2V"):
        detect_dit_layout(state)
    diffusers = diffusers_state(wan_release_state(1536, 8960, 2, 36))
    diffusers["blocks.0.attn2.add_k_proj.weight"] = _meta((1536, 1536))
    with pytest.raises(CheckpointError, match="CLIP image branch"):
        detect_dit_layout(diffusers)


def test_wan22_ti2v_5b_is_refused():
    state = wan_release_state(3072, 14336, 2, 48)
    state["head.head.weight"] = _meta((48 * 4, 3072))
    state["head.head.bias"] = _meta((48 * 4,))
    with pytest.raises(CheckpointError, match="TI2V-5B"):
        detect_dit_layout(state)
