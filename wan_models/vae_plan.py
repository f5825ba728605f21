"""How `WanVAE.decode` covers a latent, and how much GPU memory that takes (issue 7).

A `DecodePlan` has three knobs:

* `frames_per_chunk`: latent frames per pass through the decoder (after the first latent frame, which always
  decodes alone). Exact: the causal caches carry the history between passes.
* `frames_per_pass`: video frames at a time through the full-frame-rate layers (everything after the time
  doubling of the last temporal upsampling: two thirds of the work, at 4x and 8x the latent resolution);
  None takes them all at once. Also exact, and it bounds the largest activations.
* spatial tiles (`rows` x `cols` in latent pixels), each decoded with its own caches and blended linearly
  across the overlaps (weights summing to 1). Approximate (tiles do not see each other; the mid-block
  attention is global), so `plan_for_budget` tiles only when no untiled plan fits.

`estimate_decode_bytes` models the working memory of the buffered decode (`vae_fast`), in units of one
full-resolution frame at base width of the (largest) tile: the causal caches hold two input frames of every
causal convolution (`CACHE_UNITS` of them, counted from the architecture), plus the live activations of the
largest layer, which depend on the two frame counts (`_live_units`). tests/test_vae_fast_memory.py checks the
model against the live tensor bytes of real-size decodes run on the meta device; bench/vae.py against CUDA's
peak memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4
RGB_CHANNELS = 3
GIB = 2**30
# Two cached input frames of each causal conv of the decoder, in full-resolution base-width frames: stage 3
# (7 convs incl. the head) 14, stage 2 (6 convs, 2x channels at 1/4 of the pixels) 6, stage 1 (5.5 conv
# equivalents at 1/4 the frame size, and the time conv) 3.25, middle + stage 0 (11 convs at 1/16) 1.375.
CACHE_UNITS = 24.625
# Unaccounted for by the model: cuDNN workspaces and the allocator's rounding. bench/vae.py found the
# model without margins within 1% of the peak of autotuned steady-state decodes on an H200.
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 128 * 2**20
# Float32 scores and softmax of the mid-block attention if SDPA materialises them (see vae.py).
ATTENTION_SCORE_BYTES = 2 * 4 * 2**25
BUDGET_TILE_OVERLAP = 8  # latent px (64 video px), as ComfyUI's tiled VAE decoding
# (frames_per_chunk, frames_per_pass) from fastest to smallest: fewer passes cost less launch overhead
# (a pass is about 250 kernel launches), and 2 latent frames per pass beat 1 on an H200.
BUDGET_FRAME_PLANS = ((2, None), (2, 4), (1, None), (2, 2), (1, 2), (2, 1), (1, 1))


@dataclass(frozen=True)
class Tile:
    """One tile: its latent ranges, blend weight over its video pixels, and the video pixels it finishes
    (no later tile adds to them)."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    weight: torch.Tensor
    finished_rows: tuple[int, int]
    finished_cols: tuple[int, int]

    def pixels(self) -> tuple[slice, slice]:
        return _pixels(self.rows), _pixels(self.cols)

    def finished_pixels(self) -> tuple[slice, slice]:
        return _pixels(self.finished_rows), _pixels(self.finished_cols)


@dataclass(frozen=True)
class DecodePlan:
    """How `decode` covers the latent: spatial tiles (latent-pixel ranges) and frames per pass."""

    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]
    tile_size: int | None
    tile_overlap: int
    frames_per_chunk: int = 1
    frames_per_pass: int | None = None
    # cuDNN benchmark mode: on an H200 it picked Hopper kernels that decode 15% faster than those of cuDNN's
    # heuristics, but its trials take seconds and extra memory per new shape (bench/NOTES_vae.md).
    autotune: bool = True

    @property
    def tiled(self) -> bool:
        return self.tile_count > 1

    @property
    def tile_count(self) -> int:
        return len(self.rows) * len(self.cols)

    def tiles(self) -> Iterator[Tile]:
        """The tiles in decoding order (row by row); their weights sum to 1 at every pixel."""
        row_weights = _blend_weights(self.rows, SPATIAL_FACTOR)
        col_weights = _blend_weights(self.cols, SPATIAL_FACTOR)
        for i, (rows, row_weight) in enumerate(zip(self.rows, row_weights)):
            for j, (cols, col_weight) in enumerate(zip(self.cols, col_weights)):
                yield Tile(
                    rows,
                    cols,
                    row_weight[:, None] * col_weight[None, :],
                    _finished(self.rows, i),
                    _finished(self.cols, j),
                )

    def describe(self) -> str:
        frames = f"{self.frames_per_chunk} latent frame{'s' if self.frames_per_chunk > 1 else ''} per pass"
        if self.frames_per_pass is not None:
            frames += f", full-rate layers {self.frames_per_pass} video frame(s) at a time"
        if not self.autotune:
            frames += ", cuDNN heuristics (no autotuning)"
        if not self.tiled:
            return f"untiled, {frames}"
        return (
            f"{len(self.rows)}x{len(self.cols)} spatial tiles of up to {self.tile_size} latent px "
            f"(overlap >= {self.tile_overlap}, linear seam blending), {frames}"
        )


def plan_decode(
    latent_shape: torch.Size | tuple[int, ...],
    tile_size: int | tuple[int, int] | None = None,
    tile_overlap: int | None = None,
    frames_per_chunk: int = 1,
    frames_per_pass: int | None = None,
) -> DecodePlan:
    """The plan `decode` uses for a latent of this shape. `tile_size=None` (or >= the size): no tiling.

    `tile_size` (one side, or (height, width)) and `tile_overlap` are in latent pixels (x8 in the video);
    the overlap defaults to a quarter of the smaller tile side. Tiles are spread evenly so that neighbours
    overlap by at least `tile_overlap`.
    """
    if frames_per_chunk < 1 or (frames_per_pass is not None and frames_per_pass < 1):
        raise ValueError(
            f"frames_per_chunk {frames_per_chunk} / frames_per_pass {frames_per_pass}: both must be >= 1 "
            "(frames_per_pass may be None for all frames at once)"
        )
    height, width = latent_shape[-2:]
    if tile_size is None:
        return DecodePlan(((0, height),), ((0, width),), None, 0, frames_per_chunk, frames_per_pass)
    tile_height, tile_width = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    overlap = min(tile_height, tile_width) // 4 if tile_overlap is None else tile_overlap
    if min(tile_height, tile_width) < 1 or not 0 <= overlap < min(tile_height, tile_width):
        raise ValueError(
            f"tile_size {tile_size} / tile_overlap {overlap}: "
            "need tile_size >= 1 and 0 <= tile_overlap < tile_size (both in latent pixels)"
        )
    return DecodePlan(
        _tile_ranges(height, tile_height, overlap),
        _tile_ranges(width, tile_width, overlap),
        max(tile_height, tile_width),
        overlap,
        frames_per_chunk,
        frames_per_pass,
    )


def estimate_decode_bytes(
    plan: DecodePlan,
    latent_shape: torch.Size | tuple[int, ...],
    base_dim: int,
    element_size: int,
    output_on_device: bool,
) -> int:
    """Modelled peak of what the decode allocates on its device (weights and input not included): the
    decoder's working memory with a margin, plus the float32 video when it is built on the device."""
    working = decode_working_bytes(plan, latent_shape, base_dim, element_size)
    batch, _, frames, height, width = latent_shape
    video_frames = 1 + TEMPORAL_FACTOR * (frames - 1)
    video = 4 * batch * 3 * video_frames * height * width * SPATIAL_FACTOR**2 if output_on_device else 0
    return int(working * (1 + MARGIN_FRACTION)) + MARGIN_BYTES + video


def decode_working_bytes(
    plan: DecodePlan, latent_shape: torch.Size | tuple[int, ...], base_dim: int, element_size: int
) -> int:
    """The decoder's causal caches plus its largest live activations, for the largest tile."""
    tile_pixels = max(b - a for a, b in plan.rows) * max(b - a for a, b in plan.cols)
    frame_unit = latent_shape[0] * base_dim * tile_pixels * SPATIAL_FACTOR**2 * element_size
    units = CACHE_UNITS + _live_units(plan.frames_per_chunk, plan.frames_per_pass, base_dim)
    attention = min(ATTENTION_SCORE_BYTES, 2 * 4 * tile_pixels**2)
    return int(frame_unit * units) + attention


def _live_units(frames_per_chunk: int, frames_per_pass: int | None, base_dim: int) -> float:
    """Largest live activations beside the caches, in full-resolution base-width frames.

    The doubled frames kept for the full-rate passes (4 channels-x at 1/16 of the pixels per video frame:
    `frames_per_chunk` units), the decoded RGB frames of the chunk (its passes' and their concatenation),
    plus the larger of the last upsampling (input 0.5, nearest-upsampled 2, output 1 per frame) and a
    full-resolution residual conv (input, buffer with 2 cached frames, output).
    """
    video_frames = TEMPORAL_FACTOR * frames_per_chunk
    per_pass = video_frames if frames_per_pass is None else min(video_frames, frames_per_pass)
    rgb = 2 * video_frames * RGB_CHANNELS / base_dim
    return frames_per_chunk + rgb + max(3.5 * per_pass, 3 * per_pass + 2)


def plan_for_budget(
    latent_shape: torch.Size | tuple[int, ...],
    budget_bytes: int,
    resident_bytes: int,
    base_dim: int,
    element_size: int,
    output_on_device: bool,
) -> DecodePlan:
    """The fastest plan whose `estimate_decode_bytes` plus `resident_bytes` (the VAE's weights) fits
    `budget_bytes`: untiled (exact) if possible with fewer frames per pass (`BUDGET_FRAME_PLANS`), else
    the tiling with the least decoded area (overlap `BUDGET_TILE_OVERLAP`). Without cuDNN autotuning, whose
    trials would take memory beyond the model."""

    def need(plan: DecodePlan) -> int:
        estimate = estimate_decode_bytes(plan, latent_shape, base_dim, element_size, output_on_device)
        return resident_bytes + estimate

    height, width = latent_shape[-2:]
    for rows, cols in _tilings_by_area(height, width, BUDGET_TILE_OVERLAP):
        tiled = len(rows) * len(cols) > 1
        tile_size = max(b - a for a, b in (*rows, *cols)) if tiled else None
        for frames_per_chunk, frames_per_pass in BUDGET_FRAME_PLANS:
            overlap = BUDGET_TILE_OVERLAP if tiled else 0
            plan = DecodePlan(
                rows, cols, tile_size, overlap, frames_per_chunk, frames_per_pass, autotune=False
            )
            if need(plan) <= budget_bytes:
                return plan
    side = 2 * BUDGET_TILE_OVERLAP
    smallest = need(plan_decode(latent_shape, side, BUDGET_TILE_OVERLAP, 1, 1))
    raise ValueError(
        f"a VRAM budget of {budget_bytes / GIB:.2f} GiB is too small to decode a latent of shape "
        f"{tuple(latent_shape)}: even {side}x{side}-latent-pixel tiles need {smallest / GIB:.2f} GiB "
        f"(the VAE's weights included); raise the budget"
        + ("" if not output_on_device else ", or decode to the CPU (output_device='cpu')")
    )


def _tilings_by_area(height: int, width: int, overlap: int) -> list[tuple[tuple, tuple]]:
    """(row ranges, column ranges) of every even tiling with tiles >= 2 overlaps, least decoded area first."""
    options = []
    for row_count in range(1, height + 1):
        rows = _even_ranges(height, row_count, overlap)
        if rows is None:
            break
        for col_count in range(1, width + 1):
            cols = _even_ranges(width, col_count, overlap)
            if cols is None:
                break
            area = sum(b - a for a, b in rows) * sum(b - a for a, b in cols)
            options.append((area, row_count * col_count, rows, cols))
    options.sort(key=lambda option: option[:2])
    return [(rows, cols) for _, _, rows, cols in options]


def _even_ranges(length: int, count: int, overlap: int) -> tuple[tuple[int, int], ...] | None:
    if count == 1:
        return ((0, length),)
    tile = math.ceil((length + (count - 1) * overlap) / count)
    if tile < 2 * overlap or tile >= length:
        return None
    ranges = _tile_ranges(length, tile, overlap)
    return ranges if len(ranges) == count else None


def _tile_ranges(length: int, tile: int, overlap: int) -> tuple[tuple[int, int], ...]:
    if tile >= length:
        return ((0, length),)
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return tuple((start, start + tile) for start in starts)


def _finished(ranges: tuple[tuple[int, int], ...], index: int) -> tuple[int, int]:
    """The part of tile `index` that no later tile along this axis covers."""
    start, end = ranges[index]
    return start, ranges[index + 1][0] if index + 1 < len(ranges) else end


def _pixels(latent_range: tuple[int, int]) -> slice:
    return slice(latent_range[0] * SPATIAL_FACTOR, latent_range[1] * SPATIAL_FACTOR)


def _blend_weights(ranges: tuple[tuple[int, int], ...], scale: int) -> list[torch.Tensor]:
    """Per tile, 1-D weights over its video pixels: linear ramps across overlaps, summing to 1 everywhere."""
    ramps = []
    for i, (start, end) in enumerate(ranges):
        pixels = torch.arange(start * scale, end * scale, dtype=torch.float64) + 0.5
        weight = torch.ones_like(pixels)
        if i > 0 and ranges[i - 1][1] > start:
            weight = torch.minimum(weight, (pixels - start * scale) / ((ranges[i - 1][1] - start) * scale))
        if i + 1 < len(ranges) and ranges[i + 1][0] < end:
            weight = torch.minimum(weight, (end * scale - pixels) / ((end - ranges[i + 1][0]) * scale))
        ramps.append(weight)
    total = torch.zeros(ranges[-1][1] * scale, dtype=torch.float64)
    for (start, end), weight in zip(ranges, ramps):
        total[start * scale : end * scale] += weight
    return [(w / total[s * scale : e * scale]).float() for (s, e), w in zip(ranges, ramps)]
