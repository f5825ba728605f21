"""Start ComfyUI's main.py with a guard that lets a GPU-only torchvision import under a CPU torch.

Usage: python tools/comfy_launch.py COMFYUI_DIR [main.py arguments ...]

ComfyUI imports torchvision at start-up. The only torchvision wheel matching torch 2.13 is a CUDA build whose
compiled extension cannot load against a CPU torch; its Python part then fails at import because the
`torchvision::nms` operator schema was never registered. The guard runs once, right before torchvision is
first imported: it tries to load the compiled extension and, only if that fails, declares the two operator
schemas the Python part registers fake kernels for. Everything pure-Python in torchvision then works; its
compiled ops raise if called (ComfyUI core never calls them). With a matching build the guard does nothing.
See shared/spec/COMFYUI_HOST.md, section 1.3.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import runpy
import sys
from pathlib import Path

# Operator schemas torchvision's _meta_registrations.py expects the compiled extension to have declared.
TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class TorchvisionGuard(importlib.abc.MetaPathFinder):
    """A one-shot import hook: prepares torch's operator registry, then lets the real import proceed."""

    # The declarations live as long as their Library object; the guard itself is dropped after one use.
    library = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            self._declare_missing_ops(Path(next(iter(spec.submodule_search_locations))))
        return None  # the regular finders import the package

    def _declare_missing_ops(self, package_dir: Path) -> None:
        import torch

        try:
            torch.ops.load_library(str(package_dir / "_C.so"))
            return
        except OSError:
            pass
        library = torch.library.Library("torchvision", "DEF")
        for schema in TORCHVISION_SCHEMAS:
            library.define(schema)
        TorchvisionGuard.library = library


def install_guard() -> None:
    """Put the guard in front of the import system (before anything imports torchvision)."""
    if "torchvision" not in sys.modules:
        sys.meta_path.insert(0, TorchvisionGuard())


def run_comfyui(tree: Path, arguments: list[str]) -> None:
    main = tree / "main.py"
    if not main.exists():
        sys.exit(f"{tree} holds no ComfyUI tree (no main.py); run `make setup` or set COMFYUI_DIR")
    install_guard()
    sys.argv = [str(main), *arguments]
    sys.path.insert(0, str(tree))
    runpy.run_path(str(main), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run_comfyui(Path(sys.argv[1]).resolve(), sys.argv[2:])
