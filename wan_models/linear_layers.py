"""Linear layers for the DiT blocks: dense `nn.Linear`, TurboDiffusion's int8 (`-quant`) storage, fp8, or
int8 with one scale per output channel (`Int8RowwiseLinear`, opt-in: other numerics than `-quant`).

A linear factory is `factory(in_features, out_features, bias=True) -> nn.Module`; WanDiT builds the linears
inside its blocks with it, so the model code does not know how weights are stored.

How the quantised layers compute (`activations`):
* "w8a8": activations are quantised too and the product runs on int8 / fp8 tensor cores. For `Int8Linear`
  this is TurboDiffusion's exact semantics (TURBODIFFUSION.md §11): 128×128 activation tiles, int32 sums
  per 128-wide K block, float32 dequant-accumulate, output in the activation dtype, bias added in it.
* "weight_only": the weight is dequantised to the activation dtype and multiplied by a dense matmul.
* "auto" (default): "w8a8" for bf16 / fp16 activations, "weight_only" for float32. TurboDiffusion's
  quantiser only takes fp16 / bf16 input, so bf16 / fp16 runs (every GPU run, and bf16 on the CPU) follow
  the reference semantics on every device, the CPU included; a float32 model exists to get the most
  accurate answer the stored weights allow, which quantising its activations would throw away.
Which kernel runs on a device is decided in `linear_kernels`.

An `Fp8Linear` in W8A8 mode also takes `Fp8Activations`, an input quantised beforehand: the block quantises
the normalised rows that q, k and v (or cross-attention's q, or FFN's up-projection) read once, in the
LayerNorm kernel where it can, instead of once per linear (`takes_fp8_activations` says where that applies).
The codes and scales are those the layer would compute itself, so the outputs are the same bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..turbo_kernels.fp8_linear import E4M3
from ..turbo_kernels.w8a8_reference import TILE as INT8_TILE
from ..turbo_kernels.w8a8_reference import dequantize_tiles
from . import linear_kernels
from .linear_kernels import fp8_w8a8_linear, fp8_w8a8_linear_quantized, int8_linear, int8_rowwise_linear

LinearFactory = Callable[..., nn.Module]
ACTIVATION_MODES = ("auto", "w8a8", "weight_only")
HALF_DTYPES = (torch.bfloat16, torch.float16)


def quantizes_activations(activations: str, dtype: torch.dtype) -> bool:
    """Whether a quantised layer in mode `activations` runs W8A8 on inputs of `dtype`."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    return activations == "w8a8" or (activations == "auto" and dtype in HALF_DTYPES)


@dataclass(frozen=True)
class Fp8Activations:
    """An fp8 linear's input x [..., K] quantised per token: e4m3 `codes` [M, K] and float32 `scale` [M] of
    x viewed as M rows, with x's `shape` and `dtype` (the output's dtype)."""

    codes: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


class _QuantisedLinear(nn.Module):
    """Shared construction, shape bookkeeping and forward of the int8 and fp8 layers (buffers only, no
    parameters): a subclass registers its weight buffers in `register_weight`, the bias follows them."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.bfloat16,
        activations: str = "auto",
    ) -> None:
        super().__init__()
        quantizes_activations(activations, torch.bfloat16)  # validates the mode
        self.in_features = in_features
        self.out_features = out_features
        self.activations = activations
        self.register_weight(device)
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        )

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """x [..., in] -> [..., out]; `gelu` applies GELU-tanh to the result (in the GEMM's epilogue where
        `fuses_gelu` says so, else after it)."""
        flat = x.reshape(-1, self.in_features)
        if quantizes_activations(self.activations, x.dtype):
            out = self.w8a8(flat, gelu)
        else:
            out = F.linear(flat, self.dequantized_weight(x.dtype))
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            if gelu:
                out = F.gelu(out, approximate="tanh")
        return out.reshape(*x.shape[:-1], self.out_features)

    def fuses_gelu(self, x: torch.Tensor | Fp8Activations) -> bool:
        """Whether `forward(x, gelu=True)` applies the GELU inside the GEMM (no separate kernel)."""
        return False

    def register_weight(self, device: torch.device | str | None) -> None:
        raise NotImplementedError

    def w8a8(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activations={self.activations}"
        )


class Int8Linear(_QuantisedLinear):
    """A linear layer stored as int8 weights with one float32 scale per 128x128 tile.

    Its state (`int8_weight`, `scale`, `bias` buffers) has the key names and shapes of TurboDiffusion's
    `-quant` checkpoints. Cast models holding it with the loader, not with `module.to(dtype)`, which would
    also cast the float32 scales.
    """

    def register_weight(self, device: torch.device | str | None) -> None:
        rows, columns = self.out_features, self.in_features
        scale_shape = (math.ceil(rows / INT8_TILE), math.ceil(columns / INT8_TILE))
        self.register_buffer("int8_weight", torch.empty(rows, columns, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(scale_shape, dtype=torch.float32, device=device))

    def w8a8(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        out = int8_linear(x, self.int8_weight, self.scale, self.bias)
        return F.gelu(out, approximate="tanh") if gelu else out

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_tiles(self.int8_weight, self.scale, dtype)


class Fp8Linear(_QuantisedLinear):
    """A linear layer stored as float8_e4m3fn weights with one float32 scale per output channel.

    State: `weight` (e4m3 [out, in]), `weight_scale` (float32 [out]), `bias`; W[n, k] = weight[n, k] ·
    weight_scale[n]. In "w8a8" mode activations get one e4m3 scale per token (`turbo_kernels.fp8_linear`).
    """

    def register_weight(self, device: torch.device | str | None) -> None:
        rows, columns = self.out_features, self.in_features
        self.register_buffer("weight", torch.empty(rows, columns, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.empty(rows, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor | Fp8Activations, gelu: bool = False) -> torch.Tensor:
        if not isinstance(x, Fp8Activations):
            return super().forward(x, gelu)
        if x.shape[-1] != self.in_features or not quantizes_activations(self.activations, x.dtype):
            raise ValueError(
                f"{self} got activations quantised beforehand ({tuple(x.shape)}, {x.dtype}) that it does not "
                f"take; check takes_fp8_activations before quantising"
            )
        out = fp8_w8a8_linear_quantized(
            x.codes, x.scale, x.dtype, self.weight, self.weight_scale, self.bias, gelu
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def fuses_gelu(self, x: torch.Tensor | Fp8Activations) -> bool:
        device = x.codes.device if isinstance(x, Fp8Activations) else x.device
        w8a8 = quantizes_activations(self.activations, x.dtype)
        return w8a8 and linear_kernels.fp8_gemm_fuses_gelu(device, x.dtype)

    def w8a8(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        return fp8_w8a8_linear(x, self.weight, self.weight_scale, self.bias, gelu)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)


class Int8RowwiseLinear(_QuantisedLinear):
    """A linear layer stored as int8 weights with one float32 scale per output channel (KERNELS.md §4.6 "fast
    path"; made at load time from bf16/fp16/fp32 weights or re-quantised from `-quant` tiles).

    State: `weight` (int8 [out, in]), `weight_scale` (float32 [out]), `bias`; W[n, k] = weight[n, k] ·
    weight_scale[n]. In "w8a8" mode activations get one int8 scale per token and the product is summed
    exactly over the whole K (`linear_kernels.int8_rowwise_linear`).
    """

    def register_weight(self, device: torch.device | str | None) -> None:
        rows, columns = self.out_features, self.in_features
        self.register_buffer("weight", torch.empty(rows, columns, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(rows, dtype=torch.float32, device=device))

    def fuses_gelu(self, x: torch.Tensor | Fp8Activations) -> bool:
        w8a8 = isinstance(x, torch.Tensor) and quantizes_activations(self.activations, x.dtype)
        return w8a8 and linear_kernels.int8_rowwise_fuses_gelu(x.device, x.dtype)

    def w8a8(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        return int8_rowwise_linear(x, self.weight, self.weight_scale, self.bias, gelu)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)


QUANTISED_LINEARS = (Int8Linear, Fp8Linear, Int8RowwiseLinear)


def takes_fp8_activations(layers: Iterable[nn.Module], dtype: torch.dtype) -> bool:
    """Whether every layer is an `Fp8Linear` quantising inputs of `dtype` (W8A8): then they can share one
    `Fp8Activations` of their common input."""
    return all(
        isinstance(layer, Fp8Linear) and quantizes_activations(layer.activations, dtype) for layer in layers
    )


def set_linear_activations(model: nn.Module, activations: str) -> None:
    """Set how every quantised linear of `model` computes: "auto", "w8a8" or "weight_only"."""
    quantizes_activations(activations, torch.bfloat16)
    for module in model.modules():
        if isinstance(module, QUANTISED_LINEARS):
            module.activations = activations


def _factory(layer_class: type[nn.Module], **options) -> LinearFactory:
    def make(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return layer_class(in_features, out_features, bias=bias, **options)

    return make


def dense_linear_factory(
    dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> LinearFactory:
    """Plain `nn.Linear` layers."""
    return _factory(nn.Linear, dtype=dtype, device=device)


def int8_linear_factory(
    bias_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None
) -> LinearFactory:
    """`Int8Linear` layers, for TurboDiffusion `-quant` checkpoints."""
    return _factory(Int8Linear, device=device, bias_dtype=bias_dtype)


def fp8_linear_factory(
    bias_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None
) -> LinearFactory:
    """`Fp8Linear` layers (models quantised to fp8 at load time)."""
    return _factory(Fp8Linear, device=device, bias_dtype=bias_dtype)


def int8_rowwise_linear_factory(
    bias_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None
) -> LinearFactory:
    """`Int8RowwiseLinear` layers (models quantised to row-wise int8 at load time)."""
    return _factory(Int8RowwiseLinear, device=device, bias_dtype=bias_dtype)
