"""Linear layers for the DiT blocks: dense `nn.Linear`, or TurboDiffusion's int8 (`-quant`) storage.

A linear factory is `factory(in_features, out_features, bias=True) -> nn.Module`; WanDiT builds the linears
inside its blocks with it, so the model code does not know how weights are stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LinearFactory = Callable[..., nn.Module]
# TurboDiffusion quantises weights in tiles of 128 output rows x 128 input columns (TURBODIFFUSION.md §11.1).
INT8_TILE = 128


def dequantize_int8_tiles(int8_weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W[i, j] = int8_weight[i, j] * scale[i // 128, j // 128], returned in `dtype`."""
    rows, columns = int8_weight.shape
    per_element = scale.repeat_interleave(INT8_TILE, 0)[:rows].repeat_interleave(INT8_TILE, 1)[:, :columns]
    return (int8_weight.to(torch.float32) * per_element.to(torch.float32)).to(dtype)


class Int8Linear(nn.Module):
    """A linear layer stored as int8 weights with one float32 scale per 128x128 tile.

    Its state (`int8_weight`, `scale`, `bias` buffers) has the key names and shapes of TurboDiffusion's
    `-quant` checkpoints. Cast models holding it with the loader, not with `module.to(dtype)`, which would
    also cast the float32 scales.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        scale_shape = (math.ceil(out_features / INT8_TILE), math.ceil(in_features / INT8_TILE))
        self.register_buffer(
            "int8_weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.empty(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ W^T in x's dtype, without bias. A fused W8A8 GPU kernel replaces this one method."""
        return F.linear(x, dequantize_int8_tiles(self.int8_weight, self.scale, x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def dense_linear_factory(
    dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> LinearFactory:
    """Plain `nn.Linear` layers."""

    def make(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)

    return make


def int8_linear_factory(
    bias_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None
) -> LinearFactory:
    """`Int8Linear` layers, for TurboDiffusion `-quant` checkpoints."""

    def make(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return Int8Linear(in_features, out_features, bias=bias, device=device, bias_dtype=bias_dtype)

    return make
