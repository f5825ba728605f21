"""Fast execution of the Wan VAE (issue 7): several frames per pass, channels-last 3-D convolutions on CUDA,
fused memory-bound steps, and no copies for the causal padding.

The VAE modules run their layers through a cache object: `conv`, `norm_conv`, `add_bias_residual`,
`upsample_frames`, and `seen` / `history` / `remember` for the resampling layers. `vae.CausalCache` does
that as the reference implementations do (concatenate the cached frames, pad, convolve, unfused norms);
`BufferedCausalCache` computes the same function:

* each causal convolution gets one buffer of `past + t` frames: the cached frames (zeros before the first
  chunk, which is exactly the causal zero padding) followed by the chunk's input, written there directly by
  the fused norm + SiLU kernel (which also adds the previous convolution's bias); the convolution pads only
  spatially (inside cuDNN), and the buffer's last `past` frames become the next cache;
* a residual block's second bias and its shortcut are added by one kernel; the nearest-x2 upsampling is a
  copy kernel (turbo_kernels/channels_last_ops.py; PyTorch's reference formulas off CUDA);
* the layout is channels-last (`torch.channels_last_3d`) on CUDA, where cuDNN runs its Hopper implicit-GEMM
  kernels for the bf16 3-D convolutions, and PyTorch's default layout elsewhere;
* chunks of any number of frames give the reference's result, because every layer is causal with exact
  caches; the one special frame is the first latent frame (it decodes to a single video frame and skips the
  temporal upsampling), so `latent_chunks` always decodes it alone.

Results equal the reference to float32 rounding (tests/test_vae_fast.py checks <= 1e-5 on the CPU) and, in
bf16, to bf16 rounding (the fused kernels round once instead of after every step; bench/vae.py measures
the difference over whole videos).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..turbo_kernels.channels_last_ops import add_bias_residual_, rms_norm_silu, upsample_nearest2x


def memory_format_for(device: torch.device) -> torch.memory_format:
    """channels-last on CUDA (cuDNN's fast 3-D convolution layout), the default layout elsewhere."""
    return torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format


@contextmanager
def cudnn_benchmark(device: torch.device, enabled: bool) -> Iterator[None]:
    """cuDNN benchmark mode on or off while the VAE runs on CUDA, restored afterwards (on, each new
    convolution shape is timed once per process; the trials take time and extra memory)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def latent_chunks(frames: int, frames_per_chunk: int) -> list[tuple[int, int]]:
    """Latent frame ranges per pass: the first frame alone, then `frames_per_chunk` at a time."""
    if frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be at least 1 latent frame; got {frames_per_chunk}")
    return [(0, 1)] + [
        (start, min(start + frames_per_chunk, frames)) for start in range(1, frames, frames_per_chunk)
    ]


def video_chunks(frames: int, frames_per_chunk: int, temporal_factor: int) -> list[tuple[int, int]]:
    """Video frame ranges per encoder pass: frame 0 alone, then `frames_per_chunk` latent frames' worth."""
    if frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be at least 1 latent frame; got {frames_per_chunk}")
    step = frames_per_chunk * temporal_factor
    return [(0, 1)] + [(start, min(start + step, frames)) for start in range(1, frames, step)]


class LayerHistory:
    """What each causal layer remembers of the previous time chunk of one clip (both caches keep it so)."""

    def __init__(self) -> None:
        self._history: dict[nn.Module, torch.Tensor | None] = {}

    def seen(self, layer: nn.Module) -> bool:
        return layer in self._history

    def history(self, layer: nn.Module) -> torch.Tensor | None:
        return self._history.get(layer)

    def remember(self, layer: nn.Module, frames: torch.Tensor | None) -> None:
        self._history[layer] = frames


class BufferedCausalCache(LayerHistory):
    """What each causal layer remembers of the previous chunk; buffered convolutions (module docstring)."""

    def __init__(self, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.memory_format = memory_format

    def conv(self, conv: nn.Conv3d, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        return self.norm_conv(None, conv, x, add_bias=add_bias)

    def norm_conv(
        self,
        norm: nn.Module | None,
        conv: nn.Conv3d,
        x: torch.Tensor,
        input_bias: torch.Tensor | None = None,
        add_bias: bool = True,
    ) -> torch.Tensor:
        """`conv(SiLU(norm(x + input_bias)))` (`conv(x)` without a norm), the cached frames in front; the
        conv's own bias only if `add_bias` (else the caller adds it in a fused step)."""
        past = conv.past_frames
        pad_w, _, pad_h, _ = conv.spatial_padding
        bias = conv.bias if add_bias else None
        if not past:
            source = x if norm is None else rms_norm_silu(x, norm.gamma, norm.scale, bias=input_bias)
            return F.conv3d(source, conv.weight, bias, conv.stride, padding=(0, pad_h, pad_w))
        batch, channels, frames, height, width = x.shape
        buffer = torch.empty(
            (batch, channels, past + frames, height, width),
            dtype=x.dtype,
            device=x.device,
            memory_format=self.memory_format,
        )
        history = self.history(conv)
        if history is None:
            buffer[:, :, :past].zero_()
        else:
            buffer[:, :, :past].copy_(history)
        if norm is None:
            buffer[:, :, past:].copy_(x)
        else:
            rms_norm_silu(x, norm.gamma, norm.scale, out=buffer[:, :, past:], bias=input_bias)
        del x  # a temporary of the caller (a residual block's first conv output) is freed before convolving
        if history is None:
            self.remember(conv, buffer[:, :, -past:].clone())
        else:
            history.copy_(buffer[:, :, -past:])
        return F.conv3d(buffer, conv.weight, bias, conv.stride, padding=(0, pad_h, pad_w))

    def add_bias_residual(self, h: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return add_bias_residual_(h, bias, residual)

    def upsample_frames(self, resample: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """Nearest x2 (a copy kernel), then the 3x3 conv, on all frames at once."""
        conv = resample[1]
        batch, frames = x.shape[0], x.shape[2]
        up = upsample_nearest2x(x.transpose(1, 2).flatten(0, 1))
        out = F.conv2d(up, conv.weight, conv.bias, padding=conv.padding)
        return out.unflatten(0, (batch, frames)).transpose(1, 2)
