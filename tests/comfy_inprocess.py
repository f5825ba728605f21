"""Import the pack's node modules in the test process, on top of the installed ComfyUI tree (CPU mode).

For unit tests of node behaviour that needs no server: ComfyUI's modules are importable once its tree is on
sys.path (appended, so nothing of ours is shadowed), torchvision is guarded as in tools/comfy_launch.py, and
ComfyUI's device selection is told to use the CPU before `comfy.model_management` is first imported.
"""

from __future__ import annotations

import importlib
import sys

from comfy_server import comfyui_tree_or_skip, load_tools_module


def import_comfy_and_nodes():
    """(comfy.model_management, the pack's `nodes` package) imported in-process."""
    tree = str(comfyui_tree_or_skip())
    if tree not in sys.path:
        sys.path.append(tree)
    load_tools_module("comfy_launch").install_guard()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    model_management = importlib.import_module("comfy.model_management")
    return model_management, importlib.import_module("comfyui_turbodiffusion.nodes")
