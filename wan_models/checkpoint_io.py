"""Reading checkpoint files safely, whatever their container.

Every loader (DiT, VAE, text encoder) reads through `read_state_dict`, so the rules live in one place:

* `.safetensors` (single file, a shard index `*.safetensors.index.json`, or a folder holding either);
* `.pth` / `.pt` / `.bin` / `.ckpt` pickles, read with `torch.load(weights_only=True)` only. A pickle that
  needs to execute code is refused, never loaded;
* a folder (diffusers / transformers layout): its index or its safetensors / bin files.

Errors are `CheckpointError` with a message that names the file and says what to do.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Wrappers some training tools put around the state dict.
NESTED_STATE_KEYS = ("state_dict", "model", "module", "net", "ema")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message meant for the user."""


def read_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or folder, keyed as stored."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_folder(path, device)
    name = path.name.lower()
    if name.endswith(".safetensors.index.json"):
        return _read_sharded(path, device)
    if name.endswith(".safetensors") or name.endswith(".sft"):
        return _read_safetensors(path, device)
    if name.endswith(PICKLE_SUFFIXES):
        return _read_pickle(path, device)
    raise CheckpointError(
        f"{path.name}: unsupported file type; expected .safetensors, a .safetensors.index.json, "
        f".pth/.pt/.bin/.ckpt, or a diffusers/transformers folder"
    )


def naming_file(error: CheckpointError, path: Path) -> CheckpointError:
    """`error` with the file's name in front, once (the reader's own errors already start with it)."""
    message = str(error)
    return error if message.startswith(path.name) else CheckpointError(f"{path.name}: {message}")


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` header of a safetensors file (empty for other containers)."""
    path = Path(path)
    if path.is_dir() or not path.name.lower().endswith((".safetensors", ".sft")):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({error})") from error


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as error:
        if _looks_like_text(path):
            raise CheckpointError(f"{path.name}: {_not_a_checkpoint_message(path)}") from error
        raise CheckpointError(
            f"{path.name}: the safetensors file is truncated or corrupt ({error}); download it again"
        ) from error


def _read_sharded(index_path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path.name}: not a valid shard index (no 'weight_map')") from error
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"{index_path.name} names the shard {shard}, which is missing")
        state.update(read_state_dict(shard_path, device))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(
            f"{index_path.name}: the shards lack {len(missing)} indexed tensors, e.g. {missing[0]}"
        )
    return state


def _read_folder(folder: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _read_sharded(indexes[0], device)
    files = sorted(folder.glob("*.safetensors")) or sorted(
        p for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES)
    )
    if not files:
        raise CheckpointError(f"{folder}: the folder holds no .safetensors, shard index or .bin weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_state_dict(file, device))
    return state


def _read_pickle(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    zip_container = _is_zip_container(path)
    if not zip_container and not _starts_like_a_pickle(path):
        raise CheckpointError(f"{path.name}: {_not_a_checkpoint_message(path)}")
    try:
        # Memory-mapping needs the zip container of torch >= 1.6; older files are read whole.
        loaded = torch.load(str(path), map_location=device, weights_only=True, mmap=zip_container)
    except pickle.UnpicklingError as error:
        blocked = _blocked_global(str(error))
        if blocked is None:
            raise CheckpointError(
                f"{path.name}: the file cannot be read as a PyTorch checkpoint: it is truncated or corrupt, "
                f"or a pickle that torch.save did not write ({_weights_only_detail(str(error))}); download "
                f"it again or use a .safetensors version"
            ) from error
        raise CheckpointError(
            f"{path.name}: refused to load. The file is a pickle that would run code when opened "
            f"(only plain tensor checkpoints are accepted, read with torch.load(weights_only=True)). "
            f"Use a .safetensors version of this model instead. Detail: {blocked}"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError) as error:
        # The weights-only unpickler fails on damaged opcode streams with whatever its stack operations raise.
        raise CheckpointError(
            f"{path.name}: the file is truncated or corrupt and cannot be read ({error}); download it again"
        ) from error
    return _unwrap_tensors(loaded, path)


def _starts_like_a_pickle(path: Path) -> bool:
    # Every pickle of protocol 2 or later (all torch.save files that are not zips) begins with PROTO.
    with path.open("rb") as handle:
        return handle.read(1) == b"\x80"


def _text_head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(256).lstrip().lower()


def _not_a_checkpoint_message(path: Path) -> str:
    head = _text_head(path)
    if head.startswith(b"version https://git-lfs"):
        what = "a Git LFS pointer, not the model itself (fetch it with `git lfs pull` or download the file)"
    elif head.startswith((b"<!doctype html", b"<html")):
        what = "a web page (an HTML error or login page saved instead of the model); download the file again"
    else:
        what = "not a PyTorch checkpoint (neither a torch.save zip nor a pickle); download it again"
    return f"the file is {what}"


def _looks_like_text(path: Path) -> bool:
    """A Git LFS pointer or a web page saved under a model's name."""
    return _text_head(path).startswith((b"version https://git-lfs", b"<!doctype html", b"<html"))


def _blocked_global(message: str) -> str | None:
    """The line of torch's weights-only error naming the global the pickle wanted to call, if any."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.strip()
    return None


def _weights_only_detail(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith(("Unsupported", "WeightsUnpickler"))), lines[-1])


def _is_zip_container(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _unwrap_tensors(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        for key in NESTED_STATE_KEYS:
            if isinstance(loaded.get(key), Mapping):
                return _unwrap_tensors(loaded[key], path)
    raise CheckpointError(f"{path.name}: holds no tensors (expected a state dict of named tensors)")
