"""Model files through ComfyUI's folder_paths, with errors that say where a missing file goes."""

from __future__ import annotations

import os

import folder_paths

SHARD_INDEX_SUFFIX = ".safetensors.index.json"


def model_choices(folder: str) -> list[str]:
    """Files of a model folder for a combo input, plus shard indexes of sharded safetensors checkpoints."""
    names = list(folder_paths.get_filename_list(folder))
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for directory, _, files in os.walk(root, followlinks=True):
            for file in files:
                if file.endswith(SHARD_INDEX_SUFFIX):
                    names.append(os.path.relpath(os.path.join(directory, file), root))
    return sorted(set(names))


def resolve_model_path(folder: str, name: str, node: str) -> str:
    """The full path of `name` in a model folder; FileNotFoundError that names the folders if absent."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(folder)) or f"models/{folder}"
        raise FileNotFoundError(
            f"{node}: the model file '{name}' is not in models/{folder} (searched: {searched}). "
            f"Put the file there (the README's 'which file goes where' table lists the release files) "
            f"or pick an existing file in the list."
        )
    return path
