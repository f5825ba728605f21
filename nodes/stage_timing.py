"""Per-stage wall-clock times of a TurboDiffusion job in the ComfyUI log (issue 8).

Each node times its own stage with the GPU synchronised at both ends, so the seconds are the stage's and not
the queued work of the one before, and logs one line: `TurboDiffusion timing: <stage> <seconds> s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)


def synchronised_now(*devices: torch.device | str) -> float:
    for device in {torch.device(d) for d in devices}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter()


def log_stage(stage: str, seconds: float, detail: str = "") -> None:
    logger.info("TurboDiffusion timing: %s %.3f s%s", stage, seconds, f" ({detail})" if detail else "")


@contextmanager
def timed_stage(stage: str, *devices: torch.device | str) -> Iterator[None]:
    """Logs how long the body took, with `devices` synchronised before and after."""
    start = synchronised_now(*devices)
    yield
    log_stage(stage, synchronised_now(*devices) - start)
