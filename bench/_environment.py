"""The line naming what a benchmark ran on (GPU, memory, architecture, library versions), for its report."""

from __future__ import annotations

import platform

import torch


def environment_line(device: torch.device) -> str:
    """e.g. "NVIDIA H200 (140 GiB, sm90), torch 2.9.0, python 3.11.9, triton 3.5.0"; "CPU dry run, ..."
    off the GPU."""
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        memory = properties.total_memory / 2**30
        parts.insert(0, f"{properties.name} ({memory:.0f} GiB, sm{properties.major}{properties.minor})")
    else:
        parts.insert(0, "CPU dry run")
    return ", ".join(parts)
