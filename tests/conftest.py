"""Shared fixture: one real ComfyUI server (with this pack) for every `comfy`-marked test of the session."""

from __future__ import annotations

import pytest
from comfy_server import ComfyHost, comfyui_tree_or_skip


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory) -> ComfyHost:
    host = ComfyHost(comfyui_tree_or_skip(), tmp_path_factory.mktemp("comfy_base"))
    host.start()
    yield host
    host.stop()
