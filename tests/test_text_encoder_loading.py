"""load_text_encoder on every checkpoint layout, against transformers' UMT5EncoderModel run directly.

The reference context is TurboDiffusion's: ids from AutoTokenizer (padding to 512, truncation, EOS), the
float32 transformers encoder with the attention mask, rows past each prompt's length set to zero. The batch
holds a ~235-token prompt, short ones and one truncated at 512, so both relative-bucket regimes, the mask
and truncation are exercised.
"""

from pathlib import Path

import pytest
import torch
from comfyui_turbodiffusion.wan_models import load_text_encoder
from comfyui_turbodiffusion.wan_models.text_encoder import pad_context_to_512
from safetensors.torch import save_file
from text_encoder_fixtures import (
    TEXT_LEN,
    encoder_state,
    make_tiny_umt5,
    model_with_state,
    reference_context,
    reference_ids,
    sample_prompts,
    tokenizer_model_bytes,
    write_comfy_fp8_scaled,
    write_comfy_safetensors,
    write_original_pth,
    write_tokenizer_folder,
    write_transformers_folder,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return make_tiny_umt5(seed=0)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    return write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def prompt_ids(tokenizer_folder):
    return reference_ids(sample_prompts(), tokenizer_folder)


def assert_matches_reference(encoder, reference_model, prompt_ids, atol=ATOL):
    ids, mask = prompt_ids
    context, lengths = encoder.encode_with_lengths(sample_prompts())
    expected = reference_context(reference_model, ids, mask)
    assert context.shape == (len(ids), TEXT_LEN, 64)
    assert torch.equal(lengths, mask.sum(dim=1))
    assert lengths.min() < 128 < lengths.max() == TEXT_LEN
    for row, length in zip(context, lengths):
        assert torch.all(row[length:] == 0), "positions past the prompt must be exact zeros"
        assert row[:length].abs().amin(dim=-1).gt(0).all()
    torch.testing.assert_close(context.float(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("stored_dtype", [torch.float32, torch.float16])
def test_comfy_safetensors_with_its_tokenizer(tmp_path, model, prompt_ids, stored_dtype):
    path = write_comfy_safetensors(
        tmp_path / "umt5_xxl.safetensors", model, stored_dtype, spiece=tokenizer_model_bytes()
    )
    encoder = load_text_encoder(path, dtype=torch.float32)
    assert encoder.dtype == torch.float32
    assert "spiece_model" in encoder.tokenizer.source
    reference = model_with_state(encoder_state(model, stored_dtype))
    assert_matches_reference(encoder, reference, prompt_ids)


@pytest.mark.parametrize("stored_dtype", [torch.bfloat16, torch.float32])
def test_wan_original_pth_with_the_release_tokenizer_folder(tmp_path, model, prompt_ids, stored_dtype):
    path = write_original_pth(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", model, stored_dtype)
    write_tokenizer_folder(tmp_path / "google" / "umt5-xxl")  # where the Wan release puts it
    encoder = load_text_encoder(path, dtype=torch.float32)
    reference = model_with_state(encoder_state(model, stored_dtype))
    assert_matches_reference(encoder, reference, prompt_ids)


def test_transformers_folder(tmp_path, model, prompt_ids):
    folder = write_transformers_folder(tmp_path / "umt5", model)
    encoder = load_text_encoder(folder, dtype=torch.float32)
    assert encoder.tokenizer.source == str(folder / "tokenizer.json")
    assert_matches_reference(encoder, model, prompt_ids)


def test_full_checkpoint_prefix_and_decoder_are_ignored(tmp_path, model, prompt_ids):
    prefix = "text_encoders.umt5xxl.transformer."
    state = {prefix + key: tensor for key, tensor in encoder_state(model).items()}
    state[prefix + "decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(64, 64)
    state[prefix + "lm_head.weight"] = torch.randn(512, 64)
    state["model.diffusion_model.blocks.0.self_attn.q.weight"] = torch.randn(8, 8)
    state["text_encoders.umt5xxl.spiece_model"] = torch.frombuffer(
        bytearray(tokenizer_model_bytes()), dtype=torch.uint8
    )
    save_file(state, str(tmp_path / "checkpoint.safetensors"))
    encoder = load_text_encoder(tmp_path / "checkpoint.safetensors", dtype=torch.float32)
    assert_matches_reference(encoder, model, prompt_ids)


def test_comfy_fp8_scaled(tmp_path, model, prompt_ids):
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    encoded = write_comfy_fp8_scaled(path, model, tokenizer_model_bytes())
    encoder = load_text_encoder(path, dtype=torch.float32)
    assert_matches_reference(encoder, model_with_state(encoded), prompt_ids)


@pytest.mark.parametrize("stored_dtype", [torch.float32, torch.float16])
def test_default_dtype_is_the_files(tmp_path, model, stored_dtype):
    path = write_comfy_safetensors(
        tmp_path / "umt5.safetensors", model, stored_dtype, spiece=tokenizer_model_bytes()
    )
    assert load_text_encoder(path).dtype == stored_dtype


def test_fp8_files_default_to_bfloat16(tmp_path, model):
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    write_comfy_fp8_scaled(path, model, tokenizer_model_bytes())
    assert load_text_encoder(path).dtype == torch.bfloat16


def test_bfloat16_matches_the_reference(tmp_path, model, prompt_ids):
    path = write_comfy_safetensors(tmp_path / "umt5.safetensors", model, spiece=tokenizer_model_bytes())
    encoder = load_text_encoder(path, dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    context = encoder.encode(sample_prompts())
    assert context.dtype == torch.bfloat16
    expected = reference_context(model_with_state(encoder_state(model, torch.float16)), *prompt_ids)
    assert (context.float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal((context == 0).all(dim=-1), (expected == 0).all(dim=-1))


def test_float16_keeps_the_ffn_output_in_float32(tmp_path, model, prompt_ids):
    path = write_comfy_safetensors(tmp_path / "umt5.safetensors", model, spiece=tokenizer_model_bytes())
    encoder = load_text_encoder(path, dtype=torch.float16)
    assert encoder.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert encoder.model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16
    context = encoder.encode(sample_prompts())
    assert context.dtype == torch.float16
    expected = reference_context(model_with_state(encoder_state(model, torch.float16)), *prompt_ids)
    assert (context.float() - expected).abs().max() < 0.01 * expected.abs().max()


def test_embedding_is_stored_once(tmp_path, model):
    path = write_comfy_safetensors(tmp_path / "umt5.safetensors", model, spiece=tokenizer_model_bytes())
    encoder = load_text_encoder(path, dtype=torch.float32)
    assert encoder.model.encoder.embed_tokens is encoder.model.shared
    assert not any(parameter.requires_grad for parameter in encoder.parameters())


@pytest.mark.parametrize("length", [1, 300, 512, 700])
def test_pad_context_to_512(length):
    context = torch.randn(2, length, 8)
    padded = pad_context_to_512(context)
    kept = min(length, TEXT_LEN)
    assert padded.shape == (2, TEXT_LEN, 8)
    assert torch.equal(padded[:, :kept], context[:, :kept])
    assert torch.all(padded[:, kept:] == 0)


def test_pad_context_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"\[batch, tokens, width\]"):
        pad_context_to_512(torch.zeros(512, 8))
