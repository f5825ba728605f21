"""What the loaders say about files that are not usable checkpoints (issue 2, item 6): each message names
the file once, says what the file really is, and never suggests an unsafe load."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from comfyui_turbodiffusion.wan_models import (
    CheckpointError,
    load_dit,
    load_text_encoder,
    load_vae,
    read_state_dict,
)


class _CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refused_pickle_names_the_blocked_call_and_not_torchs_unsafe_advice(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _CreatesFileWhenUnpickled(marker)}, path)

    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert "refused to load" in message
    assert "system" in message  # the call the pickle wanted to make
    assert "weights_only` set to `False`" not in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 2838000000\n",
            "Git LFS pointer",
        ),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "web page"),
        (b"this is not a checkpoint at all " * 8, "not a PyTorch checkpoint"),
        (b"\x00" * 64, "not a PyTorch checkpoint"),
    ],
)
def test_files_that_are_no_pickle_say_what_they_are(tmp_path, content, expected):
    path = tmp_path / "TurboWan2.1-T2V-1.3B-480P.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as error:
        read_state_dict(path)
    assert "run code" not in str(error.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_a_pickle_torch_save_did_not_write_is_not_called_malicious(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint") as error:
        read_state_dict(path)
    assert "run code" not in str(error.value)


@pytest.mark.parametrize("loader", [load_dit, load_vae, load_text_encoder])
def test_loaders_name_the_file_once(tmp_path, loader):
    path = tmp_path / "model.pth"
    torch.save({"a": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        loader(path)
    assert str(error.value).count("model.pth") == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 2838000000\n",
            "Git LFS pointer",
        ),
        (b"<html><body>Access denied</body></html>", "web page"),
    ],
)
def test_safetensors_that_are_text_say_what_they_are(tmp_path, content, expected):
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        read_state_dict(path)
