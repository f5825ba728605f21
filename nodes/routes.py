"""HTTP route of the pack: GET /turbodiffusion/models lists our models ComfyUI holds loaded.

Useful to see what `/free` or TD_FreeVRAM released; the tests use it too.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from aiohttp import web

from .model_patchers import loaded_models_of_ours


async def loaded_models(request: web.Request) -> web.Response:
    return web.json_response({"loaded": [asdict(info) for info in loaded_models_of_ours()]})


def register_routes() -> None:
    """Add the routes to the running ComfyUI server (none when the nodes are imported outside one)."""
    server_module = sys.modules.get("server")
    instance = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.routes.get("/turbodiffusion/models")(loaded_models)
