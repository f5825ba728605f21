"""Freeing GPU memory between parts of a workflow."""

from __future__ import annotations

import gc

from comfy import model_management as mm
from comfy.comfy_types import IO

from .model_patchers import unload_models_of_ours

CATEGORY = "TurboDiffusion"


class TD_FreeVRAM:
    DESCRIPTION = (
        "Passes its input through and, when it runs, unloads TurboDiffusion's models from the GPU "
        "(optionally ComfyUI's too) and empties the allocator cache. Shows what it freed."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (IO.ANY,)
    RETURN_NAMES = ("anything",)
    OUTPUT_TOOLTIPS = ("The input, unchanged.",)
    OUTPUT_NODE = True
    FUNCTION = "free"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "anything": (IO.ANY, {"tooltip": "Any value; freeing happens once it is computed."}),
                "unload_models": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Also unload ComfyUI's own models (ours are always unloaded).",
                    },
                ),
                "empty_cache": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Collect garbage and empty the GPU allocator cache."},
                ),
            }
        }

    def free(self, anything, unload_models, empty_cache):
        before = mm.get_free_memory(mm.get_torch_device())
        freed = unload_models_of_ours()
        others = len(mm.current_loaded_models)
        if unload_models:
            mm.unload_all_models()
        others -= len(mm.current_loaded_models)
        if empty_cache:
            gc.collect()
            mm.soft_empty_cache()
        gained = max(0, mm.get_free_memory(mm.get_torch_device()) - before)
        lines = [f"unloaded {info.kind} {info.label} ({info.size_mb:.0f} MB)" for info in freed]
        if others:
            lines.append(f"unloaded {others} other model(s)")
        lines.append(f"free device memory +{gained / 2**20:.0f} MB")
        return {"ui": {"text": ["\n".join(lines)]}, "result": (anything,)}
