"""Shared fixtures: one real ComfyUI server (with this pack) for every `comfy`-marked test of the session,
and tiny checkpoints / a start image in its base directory."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    # Imported here so that tests without a ComfyUI host (e.g. GPU tests on a bare machine) need none of
    # the server's client packages.
    from comfy_server import ComfyHost, comfyui_tree_or_skip

    host = ComfyHost(comfyui_tree_or_skip(), tmp_path_factory.mktemp("comfy_base"))
    host.start()
    yield host
    host.stop()


@pytest.fixture(scope="session")
def tiny(comfy_host):
    from comfy_tiny_models import write_tiny_models

    return write_tiny_models(comfy_host.base / "models")


@pytest.fixture(scope="session")
def start_image(comfy_host) -> str:
    """A 96x72 RGB gradient image in ComfyUI's input folder; returns its name."""
    y, x = np.mgrid[0:72, 0:96]
    pixels = np.stack([x * 255 // 95, y * 255 // 71, (x + y) * 255 // 166], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(comfy_host.base / "input" / "tiny_start.png")
    return "tiny_start.png"
