"""Test access to the real-ComfyUI helpers of tools/comfy_host.py (tools/ is not a package)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_tools_module(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


comfy_host = load_tools_module("comfy_host")
ComfyClient = comfy_host.ComfyClient
ComfyHost = comfy_host.ComfyHost
PromptRejected = comfy_host.PromptRejected
RunResult = comfy_host.RunResult


def comfyui_tree_or_skip() -> Path:
    """The installed ComfyUI tree; skips locally without one, fails in CI (where `make setup` installs it)."""
    tree = comfy_host.find_comfyui_dir()
    if tree is None:
        message = "no ComfyUI tree: run `make setup` or point COMFYUI_DIR at a ComfyUI checkout"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return tree
