"""Output sizes, frame counts and latent shapes of TurboDiffusion's Wan pipelines.

Sizes are (width, height) in pixels. Every size is a multiple of 16: the VAE downsamples by 8 and the
DiT patchifies latents by 2. Frame counts have the form 4n+1: the VAE keeps the first frame and
compresses every further 4 frames into one latent frame.
"""

from __future__ import annotations

import math

FPS = 16
DEFAULT_NUM_FRAMES = 81
LATENT_CHANNELS = 16
VAE_SPATIAL_FACTOR = 8
VAE_TEMPORAL_FACTOR = 4
SIZE_STRIDE = VAE_SPATIAL_FACTOR * 2

ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4")

# TurboDiffusion's VIDEO_RES_SIZE_INFO (rcm/datasets/utils.py): resolution -> aspect ratio -> (width, height).
VIDEO_RES_SIZE_INFO: dict[str, dict[str, tuple[int, int]]] = {
    "720": {
        "1:1": (960, 960),
        "4:3": (960, 704),
        "3:4": (704, 960),
        "16:9": (1280, 704),
        "9:16": (704, 1280),
    },
    "512": {"1:1": (512, 512), "4:3": (640, 512), "3:4": (512, 640), "16:9": (640, 384), "9:16": (384, 640)},
    "480": {"1:1": (480, 480), "4:3": (640, 480), "3:4": (480, 640), "16:9": (768, 432), "9:16": (432, 768)},
    "480p": {"1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640), "16:9": (832, 480), "9:16": (480, 832)},
    "720p": {
        "1:1": (960, 960),
        "4:3": (960, 720),
        "3:4": (720, 960),
        "16:9": (1280, 720),
        "9:16": (720, 1280),
    },
}
RESOLUTIONS = tuple(VIDEO_RES_SIZE_INFO)


def preset_size(resolution: str = "480p", aspect_ratio: str = "16:9") -> tuple[int, int]:
    """(width, height) of a TurboDiffusion resolution preset."""
    if resolution not in VIDEO_RES_SIZE_INFO:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
    sizes = VIDEO_RES_SIZE_INFO[resolution]
    if aspect_ratio not in sizes:
        raise ValueError(f"unknown aspect ratio {aspect_ratio!r}; choose one of {', '.join(ASPECT_RATIOS)}")
    return sizes[aspect_ratio]


def adaptive_size(
    image_width: int, image_height: int, resolution: str = "720p", aspect_ratio: str = "16:9"
) -> tuple[int, int]:
    """(width, height) with the preset's pixel area and the image's aspect ratio (`--adaptive_resolution`).

    Matches the reference to the pixel: square roots in float64 and Python's round-half-to-even on the
    size divided by the stride 16.
    """
    if image_width <= 0 or image_height <= 0:
        raise ValueError(f"image size must be positive, got {image_width}x{image_height}")
    preset_width, preset_height = preset_size(resolution, aspect_ratio)
    area = preset_width * preset_height
    image_aspect = image_height / image_width
    width = round(math.sqrt(area / image_aspect) / SIZE_STRIDE) * SIZE_STRIDE
    height = round(math.sqrt(area * image_aspect) / SIZE_STRIDE) * SIZE_STRIDE
    if width == 0 or height == 0:
        raise ValueError(
            f"an image of {image_width}x{image_height} is too elongated for adaptive resolution at "
            f"{resolution} {aspect_ratio} (one side rounds to 0 pixels); use a fixed resolution instead"
        )
    return width, height


def validate_size(width: int, height: int) -> tuple[int, int]:
    """Check that a custom (width, height) is usable and return it."""
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_STRIDE:
            nearest = max(SIZE_STRIDE, round(value / SIZE_STRIDE) * SIZE_STRIDE)
            raise ValueError(
                f"{name} must be a positive multiple of {SIZE_STRIDE} (VAE factor 8 x patch 2), got {value}; "
                f"use {nearest}"
            )
    return width, height


def validate_num_frames(num_frames: int) -> int:
    """Check that `num_frames` has the form 4n+1 (1, 5, ..., 77, 81, ...) and return it."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer of the form 4n+1, got {num_frames!r}")
    if (num_frames - 1) % VAE_TEMPORAL_FACTOR:
        below = num_frames - (num_frames - 1) % VAE_TEMPORAL_FACTOR
        raise ValueError(
            f"num_frames must have the form 4n+1 (e.g. 81 = 5 s at {FPS} fps), got {num_frames}; "
            f"use {below} or {below + VAE_TEMPORAL_FACTOR}"
        )
    return num_frames


def latent_num_frames(num_frames: int) -> int:
    """Latent frames for a 4n+1 pixel frame count (81 -> 21)."""
    return 1 + (validate_num_frames(num_frames) - 1) // VAE_TEMPORAL_FACTOR


def latent_shape(width: int, height: int, num_frames: int, batch: int = 1) -> tuple[int, int, int, int, int]:
    """Shape (B, 16, T_lat, H/8, W/8) of the sampler's latent for a video size."""
    validate_size(width, height)
    return (
        batch,
        LATENT_CHANNELS,
        latent_num_frames(num_frames),
        height // VAE_SPATIAL_FACTOR,
        width // VAE_SPATIAL_FACTOR,
    )
