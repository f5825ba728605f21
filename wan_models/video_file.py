"""Writing videos to mp4 (H.264) / webm (VP9) files, frame batch by frame batch, and in the background while
the VAE decodes (issue 8: the MP4 off the critical path).

* `video_to_uint8(video)`: VAE output [N, 3, F, H, W] in [-1, 1] -> uint8 RGB frames [F, H, N·W, 3] (samples
  side by side), rounded as TurboDiffusion saves them: floor(255·(1 + clamp(v))/2 + 0.5) in float32
  (TURBODIFFUSION.md §6.3); computed where the video is (a GPU shrinks the copy to the host fourfold).
* `VideoFileWriter`: PyAV encoder of uint8 frames with a constant-rate-factor, yuv420p (an odd width or
  height loses its last column / row), optional container metadata (JSON values, ComfyUI's convention).
  The file is written under a hidden temporary name beside the target and renamed once complete, so an
  error never leaves a half-written video under the final name.
* `BackgroundVideoWriter`: takes decoded chunks as the VAE produces them (`WanVAE.decode(on_chunk=...)`),
  converts them on their device, copies them to pinned host memory on a side stream and encodes them on a
  worker thread, so encoding overlaps the decoding of later chunks; `finish()` waits for the last frames.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

PYAV_CODECS = {"mp4": "libx264", "webm": "libvpx-vp9"}
MAX_CRF = {"mp4": 51, "webm": 63}
# x264's "veryfast" preset: in a CPU test (81 frames of 832x480, 2 cores) about half the encoding time of the
# default "medium" and no lookahead backlog to flush at the end, for files about 10 % larger at the same crf.
BACKGROUND_PRESET = "veryfast"
# Chunks in flight to the worker before the producer waits for the oldest: bounds pinned host memory.
MAX_PENDING_CHUNKS = 4


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[N, 3, F, H, W] in [-1, 1] (any float dtype, any device) -> uint8 [F, H, N·W, 3] on the same device."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a video [N, 3, F, H, W], got {tuple(video.shape)}")
    unit = (1.0 + video.float().clamp(-1, 1)) / 2.0
    scaled = torch.floor(unit * 255 + 0.5).to(torch.uint8)
    return scaled.permute(2, 3, 0, 4, 1).flatten(2, 3)


class VideoFileWriter:
    """Encodes uint8 RGB frame batches [n, H, W, 3] into `path`, atomically (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        fps: float,
        video_format: str = "mp4",
        crf: int = 19,
        metadata: dict[str, object] | None = None,
        preset: str | None = None,
    ) -> None:
        if video_format not in PYAV_CODECS:
            raise ValueError(f"unknown video format {video_format!r}; choose one of {', '.join(PYAV_CODECS)}")
        if not 0 <= crf <= MAX_CRF[video_format]:
            raise ValueError(f"crf {crf} is out of range for {video_format}; use 0..{MAX_CRF[video_format]}")
        self.path = Path(path)
        self.fps = fps
        self.video_format = video_format
        self.crf = crf
        self.metadata = metadata or {}
        self.preset = preset
        self.frames_written = 0
        self._temporary = self.path.with_name(f".{self.path.name}.partial")
        self._container = None
        self._stream = None

    def write(self, frames: np.ndarray) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB frames [n, H, W, 3], got {frames.dtype} {frames.shape}")
        if self._stream is None:
            self._open(frames.shape[1], frames.shape[2])
        height, width = self._stream.height, self._stream.width
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="rgb24")
            self._container.mux(self._stream.encode(picture))
            self.frames_written += 1

    def close(self) -> Path:
        """Flush the encoder, close the file and give it its final name."""
        if self._container is None:
            raise ValueError(f"no frames were written to {self.path.name}")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None
            os.replace(self._temporary, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the partial file (after an error or an interrupt)."""
        if self._container is not None:
            with contextlib.suppress(Exception):  # the file is being discarded anyway
                self._container.close()
            self._container = None
        self._temporary.unlink(missing_ok=True)

    def _open(self, height: int, width: int) -> None:
        # yuv420p subsamples chroma 2x2, so both sides must be even.
        height, width = height // 2 * 2, width // 2 * 2
        if height == 0 or width == 0:
            raise ValueError(f"frames of {width}x{height} are too small for {self.video_format}")
        options = {"movflags": "use_metadata_tags"} if self.video_format == "mp4" else {}
        self._container = av.open(str(self._temporary), mode="w", format=self.video_format, options=options)
        try:
            for key, value in self.metadata.items():
                self._container.metadata[key] = json.dumps(value)
            rate = Fraction(round(self.fps * 1000), 1000)
            stream = self._container.add_stream(PYAV_CODECS[self.video_format], rate=rate)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = 0
            stream.options = {"crf": str(self.crf), **({"preset": self.preset} if self.preset else {})}
            self._stream = stream
        except BaseException:
            self.abort()
            raise


def background_writer(
    path: str | Path, fps: float, video_format: str, crf: int, metadata: dict[str, object] | None = None
) -> BackgroundVideoWriter:
    """A `BackgroundVideoWriter` for `path`; H.264 uses the `BACKGROUND_PRESET` to keep up with decoding."""
    preset = BACKGROUND_PRESET if video_format == "mp4" else None
    return BackgroundVideoWriter(VideoFileWriter(path, fps, video_format, crf, metadata, preset=preset))


class BackgroundVideoWriter:
    """Encodes decoded video chunks on a worker thread while the caller produces the next ones.

    `add(first_frame, chunk)` takes a chunk [N, 3, f, H, W] in [-1, 1] whose frames follow the previous ones
    (the signature of `WanVAE.decode`'s `on_chunk`); `finish()` returns the path once the file is complete;
    `abort()` stops and deletes it. Errors of the worker surface in `add` or `finish`. `aborted_on_error()`
    guards the block that feeds `add`: if it raises, the writer is aborted.
    """

    def __init__(self, writer: VideoFileWriter) -> None:
        self.writer = writer
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wan-video-encoder")
        self._pending: deque[Future] = deque()
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._next_frame = 0

    def add(self, first_frame: int, chunk: torch.Tensor) -> None:
        if first_frame != self._next_frame:
            raise ValueError(
                f"chunks must arrive in order: expected frame {self._next_frame}, got {first_frame}"
            )
        self._next_frame += chunk.shape[2]
        frames = video_to_uint8(chunk)
        if frames.device.type == "cuda":
            staging = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            copies = self._copy_stream(frames.device)
            copies.wait_stream(torch.cuda.current_stream(frames.device))
            with torch.cuda.stream(copies):
                staging.copy_(frames, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            frames.record_stream(copies)
            self._submit(_encode_when_copied, self.writer, copied, staging)
        else:
            self._submit(_encode_when_copied, self.writer, None, frames.cpu())

    def finish(self) -> Path:
        try:
            while self._pending:
                self._pending.popleft().result()
            return self._worker.submit(self.writer.close).result()
        except BaseException:
            self.abort()
            raise
        finally:
            self._worker.shutdown(wait=True)

    def abort(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self.writer.abort()

    @contextlib.contextmanager
    def aborted_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device)
        return self._copy_streams[device]

    def _submit(self, task, *args) -> None:
        self._pending.append(self._worker.submit(task, *args))
        while len(self._pending) > MAX_PENDING_CHUNKS or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()


def _encode_when_copied(
    writer: VideoFileWriter, copied: torch.cuda.Event | None, frames: torch.Tensor
) -> None:
    if copied is not None:
        copied.synchronize()
    writer.write(frames.numpy())
