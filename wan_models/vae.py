"""The Wan 2.1 video VAE: causal 3-D convolutions, 8x8 spatial and 4x temporal compression, 16 channels.

Module names equal the keys of `Wan2.1_VAE.pth` and ComfyUI's `wan_2.1_vae.safetensors`, so those state dicts
load as they are (`vae_loader.load_vae` also reads the diffusers layout). The same VAE serves Wan 2.1 and the
Wan 2.2 A14B models (TURBODIFFUSION.md section 7, FORMATS.md section 2).

* `encode(video)`: `[B, 3, F, H, W]` in [-1, 1], F = 4n+1, H and W multiples of 8 -> the normalised latent
  `(mu - mean) / std` (posterior mean, no sampling), `[B, 16, 1 + (F-1)/4, H/8, W/8]`.
* `decode(latent)`: normalised latent -> video in [-1, 1], `[B, 3, 1 + 4(T-1), 8h, 8w]`, clamped to [-1, 1]
  (as the original Wan wrapper and diffusers do; TurboDiffusion clamps right after decoding).

Time is processed causally in chunks. `encode_reference` / `decode_reference` run exactly as the reference
implementations: encode takes frame 0 alone, then groups of 4 frames; decode takes one latent frame at a time;
every causal convolution carries the last `CACHE_FRAMES` input frames of the previous chunk (`CausalCache`).
`encode` / `decode` compute the same function faster (`vae_fast`: several frames per pass, channels-last on
CUDA, fused kernels); how `decode` covers the latent (frames per pass, optional spatial tiles, a VRAM budget)
is a `DecodePlan` (`vae_plan`), and the video is assembled by `vae_output` (streamed when it goes to the CPU).

Precision: everything runs in the module's dtype (bf16 in production, as TurboDiffusion does); inputs are cast
to it, the latent mean and 1/std are made in it, and results come back as float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .vae_fast import (
    BufferedCausalCache,
    LayerHistory,
    cudnn_benchmark,
    latent_chunks,
    memory_format_for,
    video_chunks,
)
from .vae_output import video_assembler
from .vae_plan import GIB, SPATIAL_FACTOR, TEMPORAL_FACTOR, DecodePlan, plan_decode, plan_for_budget

LATENT_CHANNELS = 16
CACHE_FRAMES = 2
# Latent frames per decoder pass. On an H200 (bench/NOTES_vae.md) 2 was 3-5% faster than 1 but peaked
# 1.1 GiB (480p) / 2.5 GiB (720p) higher, as high as diffusers; 1 is 2.3-2.4x diffusers' speed.
DEFAULT_FRAMES_PER_CHUNK = 1
# Likewise for the encoder (480p I2V input: 2 was 4% faster for 0.9 GiB more).
DEFAULT_ENCODE_FRAMES_PER_CHUNK = 1
# Per-channel latent statistics of the Wan 2.1 VAE (identical in every reference implementation).
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
# Channel multipliers of the stages; the encoder's 2nd and 3rd downsamplings also halve time.
DIM_MULT = (1, 2, 4, 4)
ATTENTION_SCORES_PER_CALL = 2**25  # query x key pairs per attention call (128 MiB of float32 scores)
TEMPORAL_DOWNSAMPLE = (False, True, True)

ProgressCallback = Callable[[int, int], None]
ChunkCallback = Callable[[int, torch.Tensor], None]
logger = logging.getLogger(__name__)


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded only on the past side in time; `history` frames replace that zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.past_frames = 2 * pad_t
        self.spatial_padding = (pad_w, pad_w, pad_h, pad_h)

    def forward(
        self, x: torch.Tensor, history: torch.Tensor | None = None, add_bias: bool = True
    ) -> torch.Tensor:
        past_padding = self.past_frames
        if history is not None and past_padding > 0:
            x = torch.cat([history.to(x.device), x], dim=2)
            past_padding -= history.shape[2]
        padding = (*self.spatial_padding, past_padding, 0)
        x = F.pad(x, padding) if any(padding) else x
        return F.conv3d(x, self.weight, self.bias if add_bias else None, self.stride)


class CausalCache(LayerHistory):
    """What each causal layer remembers of the previous time chunk of one clip, and how the layers run:
    as the reference implementations do (`vae_fast.BufferedCausalCache` is the fast twin)."""

    def conv(self, conv: CausalConv3d, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """Run `conv` on this chunk with the previous chunk's last input frames in front."""
        history = self.history(conv)
        tail = x[:, :, -CACHE_FRAMES:]
        if tail.shape[2] < CACHE_FRAMES and history is not None:
            tail = torch.cat([history[:, :, -1:].to(x.device), tail], dim=2)
        self.remember(conv, tail.clone())
        return conv(x, history, add_bias)

    def norm_conv(
        self,
        norm: RMSNorm,
        conv: CausalConv3d,
        x: torch.Tensor,
        input_bias: torch.Tensor | None = None,
        add_bias: bool = True,
    ) -> torch.Tensor:
        """`conv(SiLU(norm(x + input_bias)))` with the history of `conv`; its own bias only if `add_bias`."""
        if input_bias is not None:
            x = x + input_bias.view(-1, 1, 1, 1)
        return self.conv(conv, F.silu(norm(x)), add_bias)

    def add_bias_residual(self, h: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`h + bias + residual`, in place, in this order."""
        return h.add_(bias.view(-1, 1, 1, 1)).add_(residual)

    def upsample_frames(self, resample: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """The spatial part of an upsampling (nearest x2, then a 3x3 conv), frame by frame."""
        return per_frame(resample, x)


class RMSNorm(nn.Module):
    """Channel-first RMS norm: `x / max(||x||_2 over channels, eps) * sqrt(C) * gamma`."""

    def __init__(self, channels: int, per_frame: bool = False) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1) if per_frame else torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def per_frame(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D layer to every frame of `[B, C, T, H, W]`."""
    b, _, t = x.shape[:3]
    frames = layer(x.transpose(1, 2).flatten(0, 1))
    return frames.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices follow the checkpoint: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout (0 in Wan), 6 conv.
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        # Each conv's bias is added by the step that reads its output (a fused kernel on the fast path),
        # in the reference's order: conv1 + bias, norm; conv2 + bias, + shortcut. conv1's output is passed
        # on without a name so that it can be freed as soon as it is normalised.
        h = cache.norm_conv(
            norm2,
            conv2,
            cache.norm_conv(norm1, conv1, x, add_bias=False),
            input_bias=conv1.bias,
            add_bias=False,
        )
        return cache.add_bias_residual(h, conv2.bias, self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (needs no history)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, per_frame=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return x + per_frame(self._attend, x)

    def _attend(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        tokens = self.to_qkv(self.norm(frames)).permute(0, 2, 3, 1).reshape(n, 1, h * w, 3 * c)
        q, k, v = (part.contiguous() for part in tokens.chunk(3, dim=-1))
        # One frame and a block of queries per call: SDPA's math fallback (taken for these 384-channel
        # heads on an H200, bench/NOTES_vae.md) materialises the scores in float32.
        out = torch.empty_like(q)
        step = max(1, ATTENTION_SCORES_PER_CALL // (h * w))
        for i in range(n):
            for start in range(0, h * w, step):
                queries = slice(start, start + step)
                out[i, :, queries] = F.scaled_dot_product_attention(q[i, :, queries], k[i], v[i])
        return self.proj(out.reshape(n, h, w, c).permute(0, 3, 1, 2))


class Downsample(nn.Module):
    """Halve height and width (zero-pad right/bottom, stride-2 conv); optionally halve time causally."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        previous = cache.history(self)
        cache.remember(self, x[:, :, -1:].clone())
        if previous is None:  # the first chunk (frame 0) keeps its single frame
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


class Upsample(nn.Module):
    """Double height and width (nearest, then a conv halving channels); optionally double time causally."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return cache.upsample_frames(self.resample, self.double_frames(x, cache))

    def double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """The temporal part (a no-op without `time_conv`)."""
        if self.time_conv is None:
            return x
        if not cache.seen(self):  # the first latent frame stands for one video frame only
            cache.remember(self, None)
            return x
        pairs = cache.conv(self.time_conv, x)
        b, c2, t, h, w = pairs.shape
        # Channel halves are the even and odd output frames; the result keeps the memory layout of `pairs`.
        frames = torch.empty(
            (b, c2 // 2, 2 * t, h, w),
            dtype=pairs.dtype,
            device=pairs.device,
            memory_format=_memory_format_of(pairs),
        )
        frames.unflatten(2, (t, 2)).copy_(pairs.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5))
        return frames


def _memory_format_of(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_channels, 3, padding=1))


class Encoder(nn.Module):
    def __init__(self, base_dim: int, out_channels: int) -> None:
        super().__init__()
        dims = [base_dim * m for m in (1, *DIM_MULT)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [ResidualBlock(in_dim, out_dim), ResidualBlock(out_dim, out_dim)]
            if stage < len(TEMPORAL_DOWNSAMPLE):
                layers.append(Downsample(out_dim, temporal=TEMPORAL_DOWNSAMPLE[stage]))
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], out_channels)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        norm, _, conv = self.head
        return cache.norm_conv(norm, conv, x)


class Decoder(nn.Module):
    def __init__(self, base_dim: int, in_channels: int) -> None:
        super().__init__()
        dims = [base_dim * m for m in (DIM_MULT[-1], *reversed(DIM_MULT))]
        temporal_upsample = tuple(reversed(TEMPORAL_DOWNSAMPLE))
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:  # the previous upsampling halved the channels
                in_dim //= 2
            layers += [ResidualBlock(in_dim, out_dim), ResidualBlock(out_dim, out_dim)]
            layers.append(ResidualBlock(out_dim, out_dim))
            if stage < len(temporal_upsample):
                layers.append(Upsample(out_dim, temporal=temporal_upsample[stage]))
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(dims[-1], 3)
        # Everything after the time doubling of the last temporal upsampling works frame by frame.
        self.last_temporal = max(
            i for i, layer in enumerate(layers) if getattr(layer, "time_conv", None) is not None
        )

    def forward(
        self, x: torch.Tensor, cache: CausalCache, frames_per_pass: int | None = None
    ) -> torch.Tensor:
        """Decode one chunk of latent frames. The full-frame-rate layers take `frames_per_pass` video frames
        at a time (all at once when None): exact, since they are causal in time, and it bounds their memory.
        """
        x = cache.conv(self.conv1, x)
        for layer in (*self.middle, *self.upsamples[: self.last_temporal]):
            x = layer(x, cache)
        x = self.upsamples[self.last_temporal].double_frames(x, cache)
        if frames_per_pass is None or frames_per_pass >= x.shape[2]:
            return self._full_rate(x, cache)
        return torch.cat([self._full_rate(part, cache) for part in x.split(frames_per_pass, dim=2)], dim=2)

    def _full_rate(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = cache.upsample_frames(self.upsamples[self.last_temporal].resample, x)
        for layer in self.upsamples[self.last_temporal + 1 :]:
            x = layer(x, cache)
        norm, _, conv = self.head
        return cache.norm_conv(norm, conv, x)


class WanVAE(nn.Module):
    """The Wan 2.1 VAE (z 16, dim_mult [1,2,4,4], 2 residual blocks, temporal down [F,T,T]); base_dim 96 for
    the released weights."""

    def __init__(self, base_dim: int = 96) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.encoder = Encoder(base_dim, 2 * LATENT_CHANNELS)
        self.conv1 = CausalConv3d(2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)
        self.conv2 = CausalConv3d(LATENT_CHANNELS, LATENT_CHANNELS, 1)
        self.decoder = Decoder(base_dim, LATENT_CHANNELS)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) shaped for broadcasting, made in the module dtype as TurboDiffusion does."""
        mean = torch.tensor(LATENT_MEAN, dtype=self.dtype, device=self.device)
        inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=self.dtype, device=self.device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, frames_per_chunk: int = DEFAULT_ENCODE_FRAMES_PER_CHUNK
    ) -> torch.Tensor:
        """`[B, 3, F, H, W]` in [-1, 1] -> normalised latent `[B, 16, 1 + (F-1)/4, H/8, W/8]`, float32.

        Encodes frame 0 alone, then `frames_per_chunk` latent frames' worth (4 video frames each) per pass,
        with the fast execution of `vae_fast` (same result as `encode_reference`).
        """
        check_video_shape(video.shape)
        memory_format = memory_format_for(self.device)
        cache = BufferedCausalCache(memory_format)
        features = []
        with cudnn_benchmark(self.device, enabled=True):
            for start, stop in video_chunks(video.shape[2], frames_per_chunk, TEMPORAL_FACTOR):
                chunk = video[:, :, start:stop].to(self.device, self.dtype, memory_format=memory_format)
                features.append(self.encoder(chunk, cache))
        return self._normalised_mean(torch.cat(features, dim=2))

    @torch.no_grad()
    def encode_reference(self, video: torch.Tensor) -> torch.Tensor:
        """`encode` as the reference implementations run it: frame 0, then 4 frames at a time."""
        check_video_shape(video.shape)
        cache = CausalCache()
        features = torch.cat(
            [
                self.encoder(video[:, :, start:stop].to(self.device, self.dtype), cache)
                for start, stop in video_chunks(video.shape[2], 1, TEMPORAL_FACTOR)
            ],
            dim=2,
        )
        return self._normalised_mean(features)

    def _normalised_mean(self, features: torch.Tensor) -> torch.Tensor:
        mu = self.conv1(features)[:, :LATENT_CHANNELS]
        mean, inv_std = self.latent_stats()
        return ((mu - mean) * inv_std).float()

    def decode_plan(
        self,
        latent_shape: torch.Size | tuple[int, ...],
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: int | None = None,
        *,
        vram_budget_gib: float | None = None,
        frames_per_chunk: int | None = None,
        frames_per_pass: int | None = None,
        output_device: torch.device | str | None = None,
        autotune: bool | None = None,
    ) -> DecodePlan:
        """The plan `decode` follows for these arguments (see `decode`)."""
        if vram_budget_gib is None:
            chunk = DEFAULT_FRAMES_PER_CHUNK if frames_per_chunk is None else frames_per_chunk
            plan = plan_decode(latent_shape, tile_size, tile_overlap, chunk, frames_per_pass)
        elif any(
            option is not None for option in (tile_size, tile_overlap, frames_per_chunk, frames_per_pass)
        ):
            raise ValueError(
                "give either vram_budget_gib (the plan is chosen to fit it) or tile_size / tile_overlap / "
                "frames_per_chunk / frames_per_pass, not both"
            )
        else:
            weights = sum(
                t.numel() * t.element_size() for t in itertools.chain(self.parameters(), self.buffers())
            )
            output = torch.device(output_device) if output_device is not None else self.device
            plan = plan_for_budget(
                latent_shape,
                int(vram_budget_gib * GIB),
                weights,
                self.base_dim,
                torch.finfo(self.dtype).bits // 8,
                output_on_device=output.type == self.device.type,
            )
        return plan if autotune is None else dataclasses.replace(plan, autotune=autotune)

    @torch.no_grad()
    def decode(
        self,
        latent: torch.Tensor,
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: int | None = None,
        callback: ProgressCallback | None = None,
        output_device: torch.device | str | None = None,
        *,
        vram_budget_gib: float | None = None,
        frames_per_chunk: int | None = None,
        frames_per_pass: int | None = None,
        autotune: bool | None = None,
        on_chunk: ChunkCallback | None = None,
    ) -> torch.Tensor:
        """Normalised latent `[B, 16, T, h, w]` -> video `[B, 3, 1 + 4(T-1), 8h, 8w]` in [-1, 1], float32.

        The result of the causal frame-by-frame decoding (`decode_reference`), computed faster (`vae_fast`):
        `frames_per_chunk` latent frames per pass (after the first), the full-frame-rate layers
        `frames_per_pass` video frames at a time (all when None). With `tile_size` (latent pixels; one side
        or (height, width)) the frame is split into overlapping tiles, each decoded with its own caches and
        blended linearly across the seams: less memory, but not identical to untiled decoding (tiles do not
        see each other, e.g. in the mid-block attention; tests/test_vae_tiling.py states the deviation
        measured with random weights).
        `vram_budget_gib` instead chooses the plan: the fastest whose modelled peak memory on the VAE's
        device, the VAE's weights included, fits the budget; untiled if possible (`decode_plan` tells which,
        and it is logged). `autotune`: cuDNN's benchmark mode (by default on, but off for budget plans: its
        trials take seconds and memory per new shape). `callback(done, total)` is called after every pass
        with the latent frames decoded so far, over all tiles (total = frames x tiles). The video is built on
        `output_device` (default: the VAE's device); CPU output from a CUDA decode is streamed while
        decoding. `on_chunk(first_frame, frames)` receives video frames as soon as they are final, in order
        (e.g. to encode them while later ones decode): untiled, each pass's frames [B, 3, f, H, W] on the
        VAE's device in its dtype, not yet clamped; tiled, the whole video once at the end.
        """
        check_latent_shape(latent.shape)
        plan = self.decode_plan(
            latent.shape,
            tile_size,
            tile_overlap,
            vram_budget_gib=vram_budget_gib,
            frames_per_chunk=frames_per_chunk,
            frames_per_pass=frames_per_pass,
            output_device=output_device,
            autotune=autotune,
        )
        logger.info("Wan VAE decode: %s", plan.describe())
        z = self._denormalised(latent)
        batch, _, frames, height, width = z.shape
        output = video_assembler(
            (batch, 3, 1 + TEMPORAL_FACTOR * (frames - 1), height * SPATIAL_FACTOR, width * SPATIAL_FACTOR),
            self.device if output_device is None else torch.device(output_device),
            self.device,
            plan.tiled,
        )
        memory_format = memory_format_for(self.device)
        done, total = 0, frames * plan.tile_count
        try:
            with cudnn_benchmark(self.device, enabled=plan.autotune):
                for tile in plan.tiles():
                    cache = BufferedCausalCache(memory_format)
                    weight = tile.weight.to(self.device) if plan.tiled else None
                    first = 0
                    for start, stop in latent_chunks(frames, plan.frames_per_chunk):
                        chunk = z[:, :, start:stop, slice(*tile.rows), slice(*tile.cols)]
                        decoded = self.decoder(
                            chunk.contiguous(memory_format=memory_format), cache, plan.frames_per_pass
                        )
                        output.add(first, tile, decoded, weight)
                        if on_chunk is not None and not plan.tiled:
                            on_chunk(first, decoded)
                        first += decoded.shape[2]
                        done += stop - start
                        if callback is not None:
                            callback(done, total)
                    output.tile_done(tile)
            video = output.result()
            if on_chunk is not None and plan.tiled:
                on_chunk(0, video)
            return video
        finally:
            output.close()

    @torch.no_grad()
    def decode_reference(
        self,
        latent: torch.Tensor,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        output_device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """`decode` as the reference implementations run it: one latent frame at a time, through
        `CausalCache` (concatenated history, explicit padding, unfused norms), the video summed in float32."""
        check_latent_shape(latent.shape)
        plan = plan_decode(latent.shape, tile_size, tile_overlap)
        z = self._denormalised(latent)
        batch, _, frames, height, width = z.shape
        video = torch.zeros(
            (batch, 3, 1 + TEMPORAL_FACTOR * (frames - 1), height * SPATIAL_FACTOR, width * SPATIAL_FACTOR),
            dtype=torch.float32,
            device=self.device if output_device is None else output_device,
        )
        for tile in plan.tiles():
            rows, cols = tile.pixels()
            weight = tile.weight.to(video.device)
            cache, first = CausalCache(), 0
            for t in range(frames):
                decoded = self.decoder(z[:, :, t : t + 1, slice(*tile.rows), slice(*tile.cols)], cache)
                video[:, :, first : first + decoded.shape[2], rows, cols] += (
                    decoded.to(video.device).float() * weight
                )
                first += decoded.shape[2]
        return video.clamp_(-1.0, 1.0)

    def _denormalised(self, latent: torch.Tensor) -> torch.Tensor:
        """`conv2(latent / (1/std) + mean)`, in the module dtype on its device."""
        mean, inv_std = self.latent_stats()
        return self.conv2(latent.to(self.device, self.dtype) / inv_std + mean)


def check_video_shape(shape: torch.Size | tuple[int, ...]) -> None:
    """Raise a ValueError naming valid sizes unless `shape` is `[B, 3, 4n+1, 8a, 8b]`."""
    if len(shape) != 5 or shape[1] != 3:
        raise ValueError(
            f"the Wan VAE encodes videos shaped [B, 3, frames, height, width]; got {tuple(shape)}"
        )
    frames, height, width = shape[2:]
    if frames < 1 or (frames - 1) % TEMPORAL_FACTOR:
        below = 1 + (frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR
        choices = "1" if frames < 1 else f"{below} or {below + TEMPORAL_FACTOR}"
        raise ValueError(
            f"{frames} frames cannot be encoded: the Wan VAE takes 4n+1 frames (1, 5, 9, ..., 81); "
            f"use {choices}"
        )
    for name, size in (("height", height), ("width", width)):
        if size < SPATIAL_FACTOR or size % SPATIAL_FACTOR:
            below = size - size % SPATIAL_FACTOR
            above = below + SPATIAL_FACTOR
            choices = f"{above}" if below < SPATIAL_FACTOR else f"{below} or {above}"
            raise ValueError(f"video {name} {size} is not a multiple of 8; resize or crop it to {choices}")


def check_latent_shape(shape: torch.Size | tuple[int, ...]) -> None:
    if len(shape) != 5 or shape[1] != LATENT_CHANNELS or 0 in shape:
        raise ValueError(
            f"the Wan 2.1 VAE decodes latents shaped [B, 16, frames, height, width]; got {tuple(shape)}"
        )
