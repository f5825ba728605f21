"""ComfyUI-TurboDiffusion: TurboDiffusion video generation as ComfyUI nodes.

ComfyUI imports this folder as a custom-node package; `pip install -e .` also makes it importable as
`comfyui_turbodiffusion` (the library lives in `wan_models/` and `turbo_kernels/` and needs no ComfyUI).
"""

try:
    import comfy.model_management  # noqa: F401  (present only inside a ComfyUI host)
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
