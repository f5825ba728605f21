"""Assembling decoded chunks into the float32 output video in [-1, 1] (issue 7).

Untiled chunks are clamped and stored; tiled chunks are weighted, summed, and clamped once a pixel has all
its contributions (the reference's `clamp` of the finished sum). `DeviceVideo` builds the video where the
chunks are (or on any device, synchronously). `HostVideo` builds it in CPU memory while decoding on CUDA:
each chunk is clamped or weighted on the GPU, copied to pinned memory on a side stream, and stored by a
worker thread, so the transfer and the CPU-side conversion to float32 overlap the decoding of later chunks.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .vae_plan import Tile

# Chunks in flight to the CPU before the decoder waits for the oldest: bounds the pinned staging memory.
MAX_PENDING_CHUNKS = 3


class DeviceVideo:
    def __init__(self, shape: tuple[int, ...], device: torch.device, tiled: bool) -> None:
        self.tiled = tiled
        allocate = torch.zeros if tiled else torch.empty
        self.video = allocate(shape, dtype=torch.float32, device=device)

    def add(self, first_frame: int, tile: Tile, decoded: torch.Tensor, weight: torch.Tensor | None) -> None:
        rows, cols = tile.pixels()
        target = self.video[:, :, first_frame : first_frame + decoded.shape[2], rows, cols]
        if weight is None:
            target.copy_(decoded.clamp(-1.0, 1.0))
        else:
            target.add_((decoded.float() * weight).to(target.device))

    def tile_done(self, tile: Tile) -> None:
        if self.tiled:
            rows, cols = tile.finished_pixels()
            self.video[..., rows, cols].clamp_(-1.0, 1.0)

    def result(self) -> torch.Tensor:
        return self.video

    def close(self) -> None:
        """Nothing to release."""


class HostVideo:
    def __init__(self, shape: tuple[int, ...], compute_device: torch.device, tiled: bool) -> None:
        self.tiled = tiled
        self.video = (torch.zeros if tiled else torch.empty)(shape, dtype=torch.float32)
        self._device = compute_device
        self._copies = torch.cuda.Stream(compute_device)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wan-vae-output")
        self._pending: deque[Future] = deque()

    def add(self, first_frame: int, tile: Tile, decoded: torch.Tensor, weight: torch.Tensor | None) -> None:
        # NCDHW on the GPU first, so that the copy to the host is one contiguous transfer.
        part = torch.empty(decoded.shape, dtype=decoded.dtype if weight is None else torch.float32,
                           device=decoded.device)  # fmt: skip
        if weight is None:
            torch.clamp(decoded, -1.0, 1.0, out=part)
        else:
            torch.mul(decoded, weight, out=part)
        staging = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
        self._copies.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._copies):
            staging.copy_(part, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        part.record_stream(self._copies)
        rows, cols = tile.pixels()
        target = self.video[:, :, first_frame : first_frame + decoded.shape[2], rows, cols]
        self._submit(_store, copied, staging, target, weight is None)

    def tile_done(self, tile: Tile) -> None:
        if self.tiled:
            rows, cols = tile.finished_pixels()
            self._submit(_clamp, self.video[..., rows, cols])

    def result(self) -> torch.Tensor:
        while self._pending:
            self._pending.popleft().result()
        return self.video

    def close(self) -> None:
        """Stop the worker (after `result`, or abandoning the video after an error)."""
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _submit(self, task, *args) -> None:
        self._pending.append(self._worker.submit(task, *args))
        while len(self._pending) > MAX_PENDING_CHUNKS or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()


def _store(copied: torch.cuda.Event, staging: torch.Tensor, target: torch.Tensor, replace: bool) -> None:
    copied.synchronize()
    if replace:
        target.copy_(staging)
    else:
        target.add_(staging)


def _clamp(region: torch.Tensor) -> None:
    region.clamp_(-1.0, 1.0)


def video_assembler(
    shape: tuple[int, ...], output_device: torch.device, compute_device: torch.device, tiled: bool
) -> DeviceVideo | HostVideo:
    """`HostVideo` for CUDA decoding into CPU memory, else `DeviceVideo` on `output_device`."""
    if output_device.type == "cpu" and compute_device.type == "cuda":
        return HostVideo(shape, compute_device, tiled)
    return DeviceVideo(shape, output_device, tiled)
