"""The 3-D rotary position embedding of the Wan DiT (TURBODIFFUSION.md §2.4).

A head of width D rotates D/2 channel pairs: the first columns by the frame index, then equal shares by
the row and the column of the patch grid ([22 | 21 | 21] for D = 128). Pairs are interleaved
(channels 2p and 2p+1), angles and the rotation are computed in float32, as TurboDiffusion does.
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (frame, row, column) axes: 44/42/42 for D = 128."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(head_dim: int, grid: tuple[int, int, int], device: torch.device | str) -> torch.Tensor:
    """Rotation angles, float32 [T*H*W, head_dim/2], tokens in (frame, row, column) order."""
    per_axis = []
    for size, dims in zip(grid, axis_dims(head_dim)):
        exponents = torch.arange(0, dims, 2, dtype=torch.float32, device=device)[: dims // 2] / dims
        frequencies = 1.0 / (ROPE_THETA**exponents)
        positions = torch.arange(size, dtype=torch.float32, device=device)
        per_axis.append(torch.outer(positions, frequencies))
    frames, rows, columns = grid
    angles = torch.cat(
        [
            per_axis[0][:, None, None, :].expand(frames, rows, columns, -1),
            per_axis[1][None, :, None, :].expand(frames, rows, columns, -1),
            per_axis[2][None, None, :, :].expand(frames, rows, columns, -1),
        ],
        dim=-1,
    )
    return angles.reshape(frames * rows * columns, head_dim // 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, L, heads, D] by angles given as cos/sin [L, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RopeTable:
    """cos/sin tables per (grid, device), computed once and reused by every block and step."""

    def __init__(self, head_dim: int, max_entries: int = 8) -> None:
        self.head_dim = head_dim
        self.max_entries = max_entries
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, grid: tuple[int, int, int], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), torch.device(device))
        if key not in self._tables:
            if len(self._tables) >= self.max_entries:
                self._tables.pop(next(iter(self._tables)))
            angles = rope_angles(self.head_dim, grid, device)
            self._tables[key] = (torch.cos(angles), torch.sin(angles))
        return self._tables[key]
