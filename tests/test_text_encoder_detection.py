"""Layout detection, configuration from shapes, and the errors for files that are not a umT5 encoder."""

import pytest
import torch
from comfyui_turbodiffusion.wan_models import CheckpointError, load_text_encoder
from comfyui_turbodiffusion.wan_models.text_encoder import (
    build_umt5_encoder,
    check_state_matches,
    parse_text_encoder_state,
    umt5_config_from_state_dict,
)
from safetensors.torch import save_file
from text_encoder_fixtures import encoder_state, make_tiny_umt5, original_name, tokenizer_model_bytes


def real_umt5_xxl_shapes() -> dict[str, tuple[int, ...]]:
    """The 242 tensors of the umT5-XXL encoder (TURBODIFFUSION.md §8.3), in transformers names."""
    shapes = {"shared.weight": (256384, 4096), "encoder.final_layer_norm.weight": (4096,)}
    for i in range(24):
        attention, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        shapes[attention + "layer_norm.weight"] = (4096,)
        shapes.update({attention + f"SelfAttention.{name}.weight": (4096, 4096) for name in "qkvo"})
        shapes[attention + "SelfAttention.relative_attention_bias.weight"] = (32, 64)
        shapes[ffn + "layer_norm.weight"] = (4096,)
        shapes[ffn + "DenseReluDense.wi_0.weight"] = (10240, 4096)
        shapes[ffn + "DenseReluDense.wi_1.weight"] = (10240, 4096)
        shapes[ffn + "DenseReluDense.wo.weight"] = (4096, 10240)
    return shapes


@pytest.mark.parametrize("layout", ["original", "transformers"])
def test_real_size_checkpoint_detected_from_shapes_alone(layout):
    shapes = real_umt5_xxl_shapes()
    assert len(shapes) == 242
    name = original_name if layout == "original" else str
    state = {
        name(key): torch.empty(shape, dtype=torch.bfloat16, device="meta") for key, shape in shapes.items()
    }
    weights = parse_text_encoder_state(state)
    assert weights.layout == layout
    assert {key: tuple(tensor.shape) for key, tensor in weights.state.items()} == shapes
    config = umt5_config_from_state_dict(weights.state)
    assert (config.vocab_size, config.d_model, config.num_heads, config.d_kv) == (256384, 4096, 64, 64)
    assert (config.d_ff, config.num_layers, config.relative_attention_num_buckets) == (10240, 24, 32)
    assert config.relative_attention_max_distance == 128
    assert config.dense_act_fn == "gelu_new" and config.is_gated_act
    assert config.layer_norm_epsilon == 1e-6 and config.dropout_rate == 0
    check_state_matches(build_umt5_encoder(config), weights.state, "real-size")


def test_tiny_config_heads_come_from_the_position_table():
    config = umt5_config_from_state_dict(encoder_state(make_tiny_umt5()))
    assert (config.num_heads, config.d_kv, config.d_model, config.d_ff, config.num_layers) == (
        4,
        16,
        64,
        128,
        2,
    )


def write(tmp_path, state, name="model.safetensors"):
    state = dict(state)
    state["spiece_model"] = torch.frombuffer(bytearray(tokenizer_model_bytes()), dtype=torch.uint8)
    save_file(state, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["patch_embedding.weight", "blocks.0.self_attn.q.weight"], "holds a Wan DiT"),
        (["model.diffusion_model.patch_embedding.weight"], "holds a Wan DiT"),
        (["encoder.conv1.weight", "decoder.conv1.weight"], "holds the Wan VAE"),
        (["foo.weight", "bar.bias"], "not a umT5 text-encoder checkpoint"),
    ],
)
def test_other_files_are_named(tmp_path, keys, message):
    path = write(tmp_path, {key: torch.zeros(2, 2) for key in keys})
    with pytest.raises(CheckpointError, match=message):
        load_text_encoder(path)


def test_t5_v1_1_is_refused(tmp_path):
    state = encoder_state(make_tiny_umt5())
    del state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    with pytest.raises(CheckpointError, match="T5 v1.1 / mT5"):
        load_text_encoder(write(tmp_path, state))


def test_wrong_shape_is_reported(tmp_path):
    state = encoder_state(make_tiny_umt5())
    state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"] = torch.zeros(100, 64)
    with pytest.raises(
        CheckpointError, match=r"wrong shape, e\.g\. encoder\.block\.1\.layer\.1\.Dense.*wi_1"
    ):
        load_text_encoder(write(tmp_path, state))


def test_missing_tensor_is_reported(tmp_path):
    state = encoder_state(make_tiny_umt5())
    del state["encoder.block.1.layer.0.SelfAttention.v.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing tensors, e\.g\. encoder\.block\.1\.layer\.0\.Self"):
        load_text_encoder(write(tmp_path, state))


def test_unknown_tensor_in_original_layout_is_reported(tmp_path):
    state = {original_name(key): tensor for key, tensor in encoder_state(make_tiny_umt5()).items()}
    state["blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(CheckpointError, match="unexpected tensor 'blocks.0.attn.extra.weight'"):
        load_text_encoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
