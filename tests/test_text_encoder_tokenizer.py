"""Prompt cleaning, token ids against transformers' AutoTokenizer, and where the tokenizer is found.

No test touches the network: `no_network` makes any socket connection fail the test.
"""

import socket

import pytest
import torch
from comfyui_turbodiffusion.wan_models import CheckpointError, load_text_encoder
from comfyui_turbodiffusion.wan_models.tokenizer import PromptTokenizer, clean_prompt
from text_encoder_fixtures import (
    TRAINING_PROMPTS,
    encoder_state,
    make_tiny_umt5,
    reference_ids,
    sample_prompts,
    tokenizer_model_bytes,
    turbodiffusion_clean,
    write_comfy_safetensors,
    write_original_pth,
    write_tokenizer_folder,
)

# A tokenizer with a different vocabulary (the default has 400 pieces), to tell which one a loader picked.
OTHER_VOCAB_SIZE = 450


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_umt5(seed=1)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  A   cat\n\n\tsits.  ", "A cat sits."),
        ("Tom &amp;amp; Jerry &lt;3", "Tom & Jerry <3"),
        ("“Curly” quotes and ﬁne ＡＢＣ", '"Curly" quotes and fine ABC'),
        ("cafÃ© au lait", "café au lait"),
        ("一只猫\u3000在草地上", "一只猫 在草地上"),
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean == turbodiffusion_clean(raw)


@pytest.mark.parametrize("file_name", ["spiece.model", "tokenizer.json"])
def test_ids_match_autotokenizer(tmp_path, file_name):
    folder = write_tokenizer_folder(tmp_path / "tokenizer")
    expected_ids, expected_mask = reference_ids(sample_prompts(), folder)
    ids, mask = PromptTokenizer.from_file(folder / file_name)(sample_prompts())
    assert torch.equal(ids, expected_ids)
    assert torch.equal(mask, expected_mask)
    assert ids[3, -1] == 1 and mask[3].all(), "a truncated prompt still ends with EOS"
    assert (ids[1, mask[1].sum() - 1], ids[1, mask[1].sum()]) == (1, 0), "EOS, then padding with 0"


def test_spiece_tensor_round_trip_gives_the_same_ids():
    model_bytes = tokenizer_model_bytes()
    tensor = torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8)
    from_tensor = PromptTokenizer.from_sentencepiece(tensor.numpy().tobytes(), "tensor")
    assert tensor.numpy().tobytes() == model_bytes
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes, add_eos=True)
    for prompt in TRAINING_PROMPTS:
        assert from_tensor.token_ids(prompt) == processor.encode(turbodiffusion_clean(prompt))


def test_tensor_inside_the_checkpoint_comes_first(tmp_path, tiny_model):
    path = write_comfy_safetensors(tmp_path / "umt5.safetensors", tiny_model, spiece=tokenizer_model_bytes())
    other = write_tokenizer_folder(tmp_path / "other", tokenizer_model_bytes(OTHER_VOCAB_SIZE))
    write_tokenizer_folder(tmp_path, tokenizer_model_bytes(OTHER_VOCAB_SIZE))
    encoder = load_text_encoder(path, dtype=torch.float32, tokenizer=other)
    assert "spiece_model" in encoder.tokenizer.source
    assert encoder.tokenizer.vocab_size == 400


def test_named_folder_then_beside_the_checkpoint(tmp_path, tiny_model):
    path = write_original_pth(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", tiny_model)
    write_tokenizer_folder(tmp_path, tokenizer_model_bytes(OTHER_VOCAB_SIZE), json_only=True)
    named = write_tokenizer_folder(tmp_path / "named")
    assert load_text_encoder(path, tokenizer=named).tokenizer.source == str(named / "tokenizer.json")
    assert load_text_encoder(path, tokenizer=named / "spiece.model").tokenizer.source == str(
        named / "spiece.model"
    )
    assert load_text_encoder(path).tokenizer.source == str(tmp_path / "tokenizer.json")


def test_hugging_face_cache_is_the_last_resort(tmp_path, tiny_model):
    (tmp_path / "weights").mkdir()
    path = write_original_pth(tmp_path / "weights" / "umt5.pth", tiny_model, torch.float32)
    snapshot = tmp_path / "hf" / "models--google--umt5-xxl" / "snapshots" / ("0" * 40)
    write_tokenizer_folder(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    encoder = load_text_encoder(path, dtype=torch.float32, hf_cache_dir=tmp_path / "hf")
    assert encoder.tokenizer.source == str(snapshot / "tokenizer.json")


def test_download_only_when_allowed(tmp_path, tiny_model, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, *, cache_dir, local_files_only):
        calls.append((repo_id, filename, local_files_only))
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline in this test")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = write_original_pth(tmp_path / "umt5.pth", tiny_model)
    for allow_download in (False, True):
        with pytest.raises(CheckpointError):
            load_text_encoder(path, allow_download=allow_download)
    assert calls == [
        ("google/umt5-xxl", name, local_only)
        for local_only in (True, False)
        for name in ("tokenizer.json", "spiece.model")
    ]


def test_no_tokenizer_anywhere_lists_the_places(tmp_path, tiny_model):
    path = write_original_pth(tmp_path / "umt5.pth", tiny_model)
    with pytest.raises(CheckpointError) as error:
        load_text_encoder(path, hf_cache_dir=tmp_path / "empty_cache")
    message = str(error.value)
    assert "'spiece_model' tensor" in message
    assert f"tokenizer.json or spiece.model in {tmp_path}, {tmp_path / 'google' / 'umt5-xxl'}" in message
    assert "google/umt5-xxl in the local Hugging Face cache" in message
    assert "tokenizer=" in message


def test_missing_tokenizer_path_is_reported(tmp_path, tiny_model):
    path = write_original_pth(tmp_path / "umt5.pth", tiny_model)
    with pytest.raises(FileNotFoundError, match="tokenizer folder or file not found"):
        load_text_encoder(path, tokenizer=tmp_path / "nowhere")


def test_broken_spiece_tensor_is_reported(tmp_path, tiny_model):
    state = encoder_state(tiny_model)
    state["spiece_model"] = torch.arange(100, dtype=torch.uint8)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "umt5.safetensors"))
    with pytest.raises(CheckpointError, match="not a valid SentencePiece model"):
        load_text_encoder(tmp_path / "umt5.safetensors")


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    small_model = make_tiny_umt5(vocab_size=300)
    path = write_comfy_safetensors(tmp_path / "umt5.safetensors", small_model, spiece=tokenizer_model_bytes())
    with pytest.raises(CheckpointError, match="pieces, more than the 300 embeddings"):
        load_text_encoder(path)


def test_single_prompt_string_and_empty_list(tmp_path):
    tokenizer = PromptTokenizer.from_file(write_tokenizer_folder(tmp_path) / "spiece.model")
    ids, mask = tokenizer("A red fox")
    assert ids.shape == mask.shape == (1, 512)
    with pytest.raises(ValueError, match="at least one prompt"):
        tokenizer([])
