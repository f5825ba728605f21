"""Encoding IMAGE frames to a video file, atomically, with ComfyUI's workflow metadata.

Formats: mp4 (H.264, yuv420p) and webm (VP9, yuv420p) through PyAV with a constant-rate-factor
(`wan_models.video_file.VideoFileWriter`); animated gif and webp through Pillow. Metadata (the API prompt
and the canvas workflow) is stored the way ComfyUI's own savers do, so dropping the file on the canvas
reopens its workflow: container tags for mp4/webm (core SaveVideo / SaveWEBM), EXIF tags for webp (core
SaveAnimatedWEBP), the comment block for gif.

The file is written under a hidden temporary name in the target folder and renamed when complete, so an
error or an interrupt never leaves a half-written video under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..wan_models.video_file import PYAV_CODECS, VideoFileWriter

VIDEO_FORMATS = ("mp4", "webm", "gif", "webp")
MAX_CRF = {"mp4": 51, "webm": 63, "gif": 63, "webp": 63}
# EXIF tags core SaveAnimatedWEBP uses: Model (0x0110) holds the prompt, Make (0x010F) and below the
# extra_pnginfo entries such as the workflow.
_EXIF_PROMPT_TAG = 0x0110
_EXIF_FIRST_EXTRA_TAG = 0x010F

FrameCallback = Callable[[int, int], None]


def frames_to_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE [F, H, W, C] floats in 0..1 to uint8 RGB frames, rounding as TurboDiffusion does."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"expected IMAGE frames [frames, height, width, channels], got {list(images.shape)}")
    scaled = torch.floor(images[..., :3].float().clamp(0, 1) * 255 + 0.5)
    return scaled.to(torch.uint8).cpu().numpy()


def write_video(
    frames: np.ndarray,
    path: Path,
    fps: float,
    video_format: str,
    crf: int,
    metadata: dict[str, object] | None = None,
    on_frame: FrameCallback | None = None,
) -> Path:
    """Write uint8 RGB frames [F, H, W, 3] to `path`; `on_frame(done, total)` runs after each frame."""
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {video_format!r}; choose one of {', '.join(VIDEO_FORMATS)}")
    if not 0 <= crf <= MAX_CRF[video_format]:
        raise ValueError(f"crf {crf} is out of range for {video_format}; use 0..{MAX_CRF[video_format]}")
    metadata = metadata or {}
    if video_format in PYAV_CODECS:
        return _write_with_pyav(frames, path, fps, video_format, crf, metadata, on_frame)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        _write_with_pillow(frames, temporary, fps, video_format, crf, metadata, on_frame)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _write_with_pyav(frames, path, fps, video_format, crf, metadata, on_frame) -> Path:
    writer = VideoFileWriter(path, fps, video_format, crf, metadata)
    try:
        for index in range(len(frames)):
            writer.write(frames[index : index + 1])
            if on_frame is not None:
                on_frame(index + 1, len(frames))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _write_with_pillow(frames, path, fps, video_format, crf, metadata, on_frame) -> None:
    pictures = []
    for index, frame in enumerate(frames):
        pictures.append(Image.fromarray(frame))
        if on_frame is not None:
            on_frame(index + 1, len(frames))
    options: dict[str, object] = {"save_all": True, "append_images": pictures[1:], "loop": 0}
    options["duration"] = max(1, round(1000 / fps))
    if video_format == "gif":
        if metadata:
            options["comment"] = json.dumps(metadata)
    else:
        # crf maps to WebP's 0..100 quality scale; 0 means lossless as for the video codecs.
        options.update(lossless=crf == 0, quality=max(0, 100 - crf), method=4, exif=_webp_exif(metadata))
    with open(path, "wb") as handle:
        pictures[0].save(handle, format=video_format.upper(), **options)


def _webp_exif(metadata: dict[str, object]) -> Image.Exif:
    exif = Image.Exif()
    tag = _EXIF_FIRST_EXTRA_TAG
    for key, value in metadata.items():
        if key == "prompt":
            exif[_EXIF_PROMPT_TAG] = f"prompt:{json.dumps(value)}"
        else:
            exif[tag] = f"{key}:{json.dumps(value)}"
            tag -= 1
    return exif
