"""Wan2.2 I2V pieces: image preprocessing, the conditioning latent `y`, and expert placement.

Preprocessing follows TurboDiffusion's torchvision v2 pipeline (ToImage, bilinear antialiased Resize on
uint8, ToDtype(float32, scale=True), Normalize(0.5, 0.5)) without needing torchvision.
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .resolution import LATENT_CHANNELS, validate_num_frames, validate_size

MASK_CHANNELS = 4
CONDITION_CHANNELS = MASK_CHANNELS + LATENT_CHANNELS

HIGH_NOISE = "high_noise"
LOW_NOISE = "low_noise"
SINGLE_MODEL = "model"
CPU = torch.device("cpu")

ImageLike = Any  # PIL.Image.Image, numpy array or torch tensor; see `image_to_uint8`


def image_to_uint8(image: ImageLike) -> torch.Tensor:
    """An RGB image as a uint8 tensor (3, H, W) on the CPU.

    Accepts a PIL image (converted to RGB), a uint8 numpy array or tensor (H, W), (H, W, C) or (1, H, W, C),
    or a floating tensor/array in [0, 1] in the same layouts (ComfyUI's IMAGE), which is mapped back to
    uint8 by rounding 255·x. One channel is repeated to three; a fourth (alpha) channel is dropped, as
    PIL's RGB conversion does.
    """
    if isinstance(image, Image.Image):
        pixels = torch.from_numpy(np.array(image.convert("RGB"), copy=True))
    else:
        pixels = torch.as_tensor(image).detach().cpu()
        if pixels.ndim == 4 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"expected an image of shape (H, W), (H, W, C) or (1, H, W, C) with C in 1, 3, 4; "
                f"got {tuple(pixels.shape)}"
            )
        if pixels.is_floating_point():
            pixels = (pixels.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
        elif pixels.dtype != torch.uint8:
            raise ValueError(f"integer images must be uint8, got {pixels.dtype}")
        pixels = pixels.expand(-1, -1, 3) if pixels.shape[-1] == 1 else pixels[..., :3]
    # A (C, H, W) view of (H, W, C) memory, the layout torchvision's ToImage produces.
    return pixels.permute(2, 0, 1)


def image_size(image: ImageLike) -> tuple[int, int]:
    """(width, height) of an image accepted by `image_to_uint8`."""
    pixels = image_to_uint8(image)
    return pixels.shape[2], pixels.shape[1]


def _native_uint8_bilinear() -> bool:
    # torchvision resizes uint8 directly (fixed-point kernel) only where PyTorch has a vectorised uint8
    # kernel; elsewhere it resizes in float32 and rounds. The two differ by 1 on some pixels, so we take
    # the same branch to reproduce its output exactly.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def resize_uint8(
    pixels: torch.Tensor, height: int, width: int, native_uint8: bool | None = None
) -> torch.Tensor:
    """Bilinear antialiased resize of a uint8 (3, H, W) CPU image to (3, height, width), rounded to uint8.

    `native_uint8` picks the kernel (None: the one torchvision would use on this CPU).
    """
    if tuple(pixels.shape[1:]) == (height, width):
        return pixels
    if native_uint8 is None:
        native_uint8 = _native_uint8_bilinear()
    batch = pixels.unsqueeze(0) if native_uint8 else pixels.unsqueeze(0).float()
    resized = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    if not native_uint8:
        resized = resized.round_().to(torch.uint8)
    return resized[0]


def preprocess_image(image: ImageLike, width: int, height: int) -> torch.Tensor:
    """The I2V start image as float32 (1, 3, height, width) in [-1, 1] (aspect ratio stretched, no crop)."""
    validate_size(width, height)
    resized = resize_uint8(image_to_uint8(image), height, width)
    # torchvision's ToDtype(scale=True) multiplies by 1/255 (not divides); Normalize subtracts, then divides.
    unit = resized.to(torch.float32).mul_(1.0 / 255)
    return unit.sub_(0.5).div_(0.5).unsqueeze(0)


def first_frame_mask(
    latent_frames: int, latent_height: int, latent_width: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The 4-channel I2V mask (1, 4, T, H, W): ones on latent frame 0, zeros elsewhere."""
    mask = torch.zeros(1, MASK_CHANNELS, latent_frames, latent_height, latent_width, device=device)
    mask[:, :, 0] = 1.0
    return mask


def build_i2v_condition(vae: torch.nn.Module, image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The conditioning latent y (1, 20, T_lat, H/8, W/8), float32, on the VAE's device.

    `image` is a preprocessed start image (1, 3, H, W) in [-1, 1] (see `preprocess_image`). The VAE encodes
    the image followed by `num_frames - 1` frames of 0.0 (mid-grey); y = [mask (4) | latent (16)].
    """
    validate_num_frames(num_frames)
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"expected a preprocessed image of shape (1, 3, H, W), got {tuple(image.shape)}")
    image = image.to(device=module_device(vae), dtype=torch.float32)
    height, width = image.shape[2:]
    video = torch.cat([image.unsqueeze(2), image.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
    latent = vae.encode(video).float()
    mask = first_frame_mask(*latent.shape[2:], device=latent.device)
    return torch.cat([mask, latent], dim=1)


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for a module without tensors)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def move_module(module: torch.nn.Module, device: torch.device) -> None:
    """Move a module if it is not already on `device`.

    The copies are asynchronous (CUDA to CPU lands in pinned memory, which makes the way back
    asynchronous too); callers synchronise before reading results on the host.
    """
    if module_device(module) != device:
        module.to(device, non_blocking=True)


class ExpertSwitch:
    """Picks the model for each sampler step and keeps only the active one on the sampling device.

    With two experts the high-noise expert runs while the step's time t >= boundary; the first step with
    t < boundary moves it to `offload_device` and brings the low-noise expert in, once (one-way).
    The outgoing expert is moved out before the incoming one moves in, so the caching allocator hands the
    freed blocks (same shapes) to the incoming expert and peak memory stays at one expert.
    """

    def __init__(
        self,
        high_noise: torch.nn.Module,
        low_noise: torch.nn.Module | None,
        boundary: float,
        device: torch.device,
        offload_device: torch.device = CPU,
    ) -> None:
        self.high_noise = high_noise
        self.low_noise = low_noise
        self.boundary = boundary
        self.device = device
        self.offload_device = offload_device
        self.switched = False
        if low_noise is not None:
            move_module(low_noise, offload_device)
        move_module(high_noise, device)

    def select(self, t_cur: float) -> tuple[str, torch.nn.Module]:
        """(label, model) for a step starting at RF time `t_cur`; label is high_noise, low_noise or model."""
        if self.low_noise is None:
            return SINGLE_MODEL, self.high_noise
        if not self.switched and t_cur < self.boundary:
            move_module(self.high_noise, self.offload_device)
            move_module(self.low_noise, self.device)
            self.switched = True
        return (LOW_NOISE, self.low_noise) if self.switched else (HIGH_NOISE, self.high_noise)
