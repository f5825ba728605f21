"""Makes this checkout importable as `comfyui_turbodiffusion` where the package is not pip-installed (the GPU
machine runs the benchmarks from a bare copy of the repository).

A script calls `alias_checkout_as_package()` before importing anything that imports the package; running
`python bench/<name>.py` puts bench/ first on sys.path, so `from _checkout import ...` works from any working
directory.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_turbodiffusion"


def alias_checkout_as_package(root: Path = ROOT) -> None:
    """Registers `root` as the package `comfyui_turbodiffusion` unless an installed one is importable or it
    is registered already."""
    if PACKAGE not in sys.modules and importlib.util.find_spec(PACKAGE) is None:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(root)]
        sys.modules[PACKAGE] = package
