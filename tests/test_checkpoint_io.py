"""Reading checkpoints safely, and the errors load_dit gives for files it cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from comfyui_turbodiffusion.wan_models.checkpoint_io import CheckpointError, read_state_dict
from comfyui_turbodiffusion.wan_models.dit_loader import load_dit
from dit_reference import make_diffusers_model, to_original_layout
from safetensors.torch import save_file


class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tiny_original_state() -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in to_original_layout(make_diffusers_model(16).state_dict()).items()
    }


def test_pickle_that_would_run_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _CreatesFileWhenUnpickled(marker)}, path)

    with pytest.raises(CheckpointError, match="evil.pth: refused to load.*run code"):
        read_state_dict(path)
    assert not marker.exists()

    torch.load(path, weights_only=False)  # proves the payload is real: an unsafe load runs it
    assert marker.exists()


def test_truncated_files_raise_checkpoint_errors(tmp_path):
    state = {"a": torch.randn(64, 64), "b": torch.randn(64)}
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "model.pth")
    for name in ("model.safetensors", "model.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_state_dict(tmp_path / name)


def test_shard_index_naming_a_missing_shard(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "part-1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}))
    with pytest.raises(CheckpointError, match="part-2.safetensors, which is missing"):
        read_state_dict(index)
    with pytest.raises(CheckpointError, match="part-2.safetensors, which is missing"):
        load_dit(tmp_path)


def test_unknown_layout_names_the_closest_layout_and_the_keys(tmp_path):
    state = {
        key.replace("head.head.", "head.proj.").replace(".ffn.0.", ".mlp.fc1."): value
        for key, value in _tiny_original_state().items()
    }
    path = tmp_path / "renamed.safetensors"
    save_file(state, path)

    with pytest.raises(CheckpointError) as error:
        load_dit(path)

    message = str(error.value)
    assert message.startswith("renamed.safetensors: ")
    assert "Closest: Wan release safetensors" in message
    assert "head.proj.weight" in message and "blocks.0.mlp.fc1.weight" in message  # unexpected
    assert "head.head.weight" in message and "blocks.N.ffn.0.weight" in message  # missing


def test_file_of_no_known_model(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(()), "lora_unet_down.weight": torch.ones(4, 4)}, path)
    with pytest.raises(CheckpointError, match="Not a known Wan DiT layout.*First unexpected keys.*lora_unet"):
        load_dit(path)


def test_unexpected_missing_and_misshapen_keys_are_named(tmp_path):
    state = _tiny_original_state()
    cases = {
        "extra": dict(state, **{"blocks.0.extra.weight": torch.zeros(3)}),
        "missing": {k: v for k, v in state.items() if k != "blocks.1.ffn.2.bias"},
        "misshapen": dict(state, **{"blocks.1.cross_attn.o.weight": torch.zeros(256, 128)}),
    }
    expectations = {
        "extra": r"First unexpected keys \(1 in all\): blocks.0.extra.weight",
        "missing": r"First missing keys \(1 in all\): blocks.1.ffn.2.bias",
        "misshapen": r"blocks.1.cross_attn.o.weight has shape \(256, 128\) in the file.*needs \(256, 256\)",
    }
    for name, case in cases.items():
        save_file(case, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match=expectations[name]):
            load_dit(tmp_path / f"{name}.safetensors")


def test_vae_and_text_encoder_given_as_dit_say_what_they_are(tmp_path):
    vae = {
        "encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": torch.ones(96, 1, 1, 1),
        "decoder.middle.0.residual.0.gamma": torch.ones(384, 1, 1, 1),
        "conv1.weight": torch.zeros(32, 32, 1, 1, 1),
    }
    umt5 = {
        "shared.weight": torch.zeros(10, 8),
        "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(8, 8),
    }
    save_file(vae, tmp_path / "wan_2.1_vae.safetensors")
    torch.save(umt5, tmp_path / "encoder.pth")
    with pytest.raises(CheckpointError, match="wan_2.1_vae.safetensors: this file is a Wan VAE"):
        load_dit(tmp_path / "wan_2.1_vae.safetensors")
    with pytest.raises(CheckpointError, match="encoder.pth: this file is a umT5 text encoder"):
        load_dit(tmp_path / "encoder.pth")


def test_legacy_non_zip_torch_save_format_is_read(tmp_path):
    state = {"a": torch.randn(3, 4)}
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "legacy.pth")["a"], state["a"])
