"""Wan2.2 I2V pieces: image preprocessing, the conditioning latent `y`, and expert placement.

Preprocessing follows TurboDiffusion's torchvision v2 pipeline (ToImage, bilinear antialiased Resize on
uint8, ToDtype(float32, scale=True), Normalize(0.5, 0.5)) without needing torchvision.
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .block_swap import GIB, tensor_bytes
from .resolution import LATENT_CHANNELS, validate_num_frames, validate_size

logger = logging.getLogger(__name__)

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


# What a prefetch leaves free beside both experts and one forward's activation estimate: the sampler's state,
# allocator fragmentation, and workspaces that appear at first use (cuBLAS, Triton autotuning).
PREFETCH_MARGIN_BYTES = 2 * GIB


def expert_device_bytes(model: torch.nn.Module) -> int:
    """Bytes an expert occupies on its sampling device (with block swap: its resident blocks and slots)."""
    return tensor_bytes(model)


def experts_fit(
    available_bytes: int,
    expert_bytes: Sequence[int],
    activation_bytes: int,
    margin_bytes: int = PREFETCH_MARGIN_BYTES,
) -> bool:
    """Whether both experts, one forward's activations and a margin fit in `available_bytes`.

    `available_bytes` is the device memory this process could still allocate plus what the experts already
    hold there; `expert_bytes` are their device footprints (`expert_device_bytes`).
    """
    return sum(expert_bytes) + activation_bytes + margin_bytes <= available_bytes


def allocatable_bytes(device: torch.device) -> int:
    """Bytes this process could still allocate on a CUDA device.

    The driver's free memory plus what the caching allocator holds unused, within the per-process memory
    fraction (`torch.cuda.set_per_process_memory_fraction`), which caps allocated memory.
    """
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    unused_reserve = torch.cuda.memory_reserved(device) - allocated
    capped = int(torch.cuda.get_per_process_memory_fraction(device) * total) - allocated
    return min(free + unused_reserve, capped)


def can_prefetch(
    high_noise: torch.nn.Module, low_noise: torch.nn.Module, device: torch.device, activation_bytes: int
) -> bool:
    """Whether the low-noise expert can come to a CUDA `device` while the high-noise one runs there."""
    if device.type != "cuda":
        return False
    experts = (high_noise, low_noise)
    already_there = sum(expert_device_bytes(m) for m in experts if module_device(m) == device)
    return experts_fit(
        allocatable_bytes(device) + already_there,
        [expert_device_bytes(m) for m in experts],
        activation_bytes,
    )


def _state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    unique = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return list(unique.values())


class UploadStreams(Protocol):
    """What `BackgroundUpload` needs from the device (`CudaUploadStreams`; tests pass a recording fake)."""

    def mark(self) -> Any: ...

    def copy(self, tensors: Sequence[torch.Tensor], after: Any) -> tuple[list[torch.Tensor], Any]: ...

    def adopt(self, copies: Sequence[torch.Tensor], done: Any) -> None: ...


class CudaUploadStreams:
    """The CUDA part of a `BackgroundUpload`: a side stream that follows the sampling stream's queued work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)

    def mark(self) -> torch.cuda.Event:
        """An event after the work queued so far on the sampling stream (called on the sampling thread)."""
        return torch.cuda.current_stream(self.device).record_event()

    def copy(
        self, tensors: Sequence[torch.Tensor], after: torch.cuda.Event
    ) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Device copies of `tensors` made on the side stream once `after` has passed; and their end event."""
        with torch.cuda.stream(self.side):
            # Earlier device-to-host moves may still be writing these (pinned) host tensors.
            self.side.wait_event(after)
            copies = [t.to(self.device, non_blocking=True) for t in tensors]
            return copies, self.side.record_event()

    def adopt(self, copies: Sequence[torch.Tensor], done: torch.cuda.Event) -> None:
        """Make the sampling stream wait for the copies, and tell the allocator it uses them."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        for tensor in copies:
            tensor.record_stream(stream)


class BackgroundUpload:
    """Copies a module's weights to `device` from a worker thread; `finish()` installs them.

    Why a worker thread and a side stream rather than pinned staging: the experts sit in pageable CPU memory
    (ComfyUI's offload device), where `.to(cuda, non_blocking=True)` holds the calling thread until each
    tensor has been staged, so on the sampling thread it would keep the first step's kernels from being
    enqueued. Pinning first would cost a full host-side copy of the expert (and as much page-locked memory)
    before any byte moved. In a worker thread the staged copies run on the copy engine while the sampling
    stream computes, and the sampling thread only waits (join, stream event) at the switch. Weights already
    in pinned memory (e.g. moved out earlier with `move_module`) copy asynchronously all the same.

    The copies are made in the side stream's memory pool and marked as used by the sampling stream, so the
    caching allocator never hands their blocks out while sampling work may still read them.
    """

    def __init__(
        self, module: torch.nn.Module, device: torch.device, streams: UploadStreams | None = None
    ) -> None:
        self.module = module
        self.device = device
        self.streams = streams if streams is not None else CudaUploadStreams(device)
        self._tensors = _state_tensors(module)
        self._copies: list[torch.Tensor] = []
        self._done: Any = None
        self._error: BaseException | None = None
        after = self.streams.mark()
        self._thread = threading.Thread(target=self._copy, args=(after,), name="expert-prefetch", daemon=True)
        self._thread.start()

    def _copy(self, after: Any) -> None:
        try:
            self._copies, self._done = self.streams.copy(self._tensors, after)
        except BaseException as error:  # re-raised on the sampling thread by finish()
            self._error = error

    def finish(self) -> None:
        """Wait for the copies and put them in the module (the sampling stream waits on the device)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.streams.adopt(self._copies, self._done)
        copies = {id(t): c for t, c in zip(self._tensors, self._copies)}
        # Through `_apply`, as `Module.to` does, so that modules which react to a move (WanDiT drops its
        # captured CUDA graphs) see this one; a tensor that was not copied moves now.
        self.module._apply(lambda t: copies[id(t)] if id(t) in copies else t.to(self.device))
        self._tensors, self._copies = [], []


def start_upload(module: torch.nn.Module, device: torch.device) -> BackgroundUpload:
    """Begin copying `module` to `device` in the background (see `BackgroundUpload`)."""
    return BackgroundUpload(module, device)


class ExpertSwitch:
    """Picks the model for each sampler step and keeps only the active one on the sampling device.

    With two experts the high-noise expert runs while the step's time t >= boundary; the first step with
    t < boundary moves it to `offload_device` and brings the low-noise expert in, once (one-way).
    The outgoing expert is moved out before the incoming one moves in, so the caching allocator hands the
    freed blocks (same shapes) to the incoming expert and peak memory stays at one expert.

    With `prefetch` on a CUDA device where both experts and `activation_bytes` (one forward's activations,
    `block_swap.estimate_activation_bytes`) fit beside each other (`can_prefetch`), the low-noise expert
    instead stays on the device if it is there, or starts uploading in the background (`BackgroundUpload`)
    when the first high-noise step is selected, so that the copy overlaps the high-noise expert's steps
    (started any earlier, the sampler's synchronisation before its loop would wait for it). The switch
    waits for the upload, then moves the high-noise expert out as above. Should the upload run out of
    memory, the switch falls back to the plain move. Elsewhere `prefetch` changes nothing.
    """

    def __init__(
        self,
        high_noise: torch.nn.Module,
        low_noise: torch.nn.Module | None,
        boundary: float,
        device: torch.device,
        offload_device: torch.device = CPU,
        prefetch: bool = False,
        activation_bytes: int = 0,
    ) -> None:
        self.high_noise = high_noise
        self.low_noise = low_noise
        self.boundary = boundary
        self.device = device
        self.offload_device = offload_device
        self.switched = False
        self.upload: BackgroundUpload | None = None
        self.prefetching = low_noise is not None and prefetch
        if self.prefetching:
            self.prefetching = can_prefetch(high_noise, low_noise, device, activation_bytes)
        if low_noise is not None and not self.prefetching:
            move_module(low_noise, offload_device)
        move_module(high_noise, device)
        self._upload_due = self.prefetching and module_device(low_noise) != device

    def select(self, t_cur: float) -> tuple[str, torch.nn.Module]:
        """(label, model) for a step starting at RF time `t_cur`; label is high_noise, low_noise or model."""
        if self.low_noise is None:
            return SINGLE_MODEL, self.high_noise
        if not self.switched and t_cur < self.boundary:
            self._upload_due = False
            self._finish_upload()
            move_module(self.high_noise, self.offload_device)
            move_module(self.low_noise, self.device)
            self.switched = True
        elif self._upload_due:
            self._upload_due = False
            self.upload = start_upload(self.low_noise, self.device)
        return (LOW_NOISE, self.low_noise) if self.switched else (HIGH_NOISE, self.high_noise)

    def _finish_upload(self) -> None:
        if self.upload is None:
            return
        upload, self.upload = self.upload, None
        try:
            upload.finish()
        except torch.OutOfMemoryError as error:
            logger.warning(
                "prefetching the low-noise expert ran out of GPU memory (%s); switching experts without "
                "overlap. Pass prefetch_experts=False to skip the attempt.",
                str(error).splitlines()[0],
            )
