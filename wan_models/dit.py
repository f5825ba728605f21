"""The Wan 2.1 / 2.2 video DiT, with the numerics TurboDiffusion runs it with (TURBODIFFUSION.md §2).

Module names equal the original / TurboDiffusion checkpoint keys, so such a state dict loads as it is
(the patch embedding in TurboDiffusion's Linear form). The linears inside the blocks come from an injected
factory (dense or int8), the attention functions (contract in attention.py) and the norm / RoPE / residual
steps (`BlockOps`, contract in block_ops.py) are injected too: this file imports no kernel.

Precision, with the compute dtype being the dtype of `patch_embedding.weight` (bf16 for released files):
time embedding, modulation arithmetic and the output head in float32; LayerNorm and q/k RMSNorm in float32,
rounded to the compute dtype; the residual stream in the compute dtype with each gate rounded first; RoPE
in float32. Norm weights may be stored in float32 while the rest is bf16; they are cast on use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .block_ops import TORCH_BLOCK_OPS, BlockOps, layer_norm, rms_norm_rope
from .config import WanDiTConfig
from .linear_layers import LinearFactory, takes_fp8_activations
from .rope import RopeTable

AttentionFn = Callable[..., torch.Tensor]


class ForwardRunner(Protocol):
    """Runs `WanDiT.compute` in place of plain eager execution (forward_modes: CUDA graphs, torch.compile)."""

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor: ...

    def reset(self) -> None:
        """Forget what is tied to where the weights are now (they are about to move or change dtype)."""


@dataclass(frozen=True)
class AttentionFunctions:
    """Attention cores, q/k/v in (B, L, heads, D). Self-attention also receives `proj_l=`."""

    self_attention: AttentionFn
    cross_attention: AttentionFn


def sinusoidal_time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] of t * 10000^(-j / (dim/2)), computed in float64, returned as float32 [B, dim]."""
    half = dim // 2
    t = t.to(torch.float64)
    frequencies = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    phases = torch.outer(t, frequencies)
    return torch.cat([torch.cos(phases), torch.sin(phases)], dim=1).to(torch.float32)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer evaluated in float32 whatever its stored dtype (autocast-to-float32 semantics)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class RMSNorm(nn.Module):
    """RMSNorm over the full hidden size; the weight multiply happens in float32 before the cast."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_rope(x, self.weight, self.eps)


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias (the cross-attention norm `norm3`), in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.eps, self.weight, self.bias)


class SLAParameters(nn.Module):
    """Holds TurboDiffusion's SLA projection under its checkpoint path `attn_op.local_attn.proj_l`."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.local_attn = nn.Module()
        self.local_attn.proj_l = nn.Linear(head_dim, head_dim)


class AttentionProjections(nn.Module):
    """The q/k/v/o linears and the q/k RMSNorms shared by self- and cross-attention."""

    def __init__(self, config: WanDiTConfig, linear_factory: LinearFactory) -> None:
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q = linear_factory(dim, dim)
        self.k = linear_factory(dim, dim)
        self.v = linear_factory(dim, dim)
        self.o = linear_factory(dim, dim)
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)


class SelfAttention(AttentionProjections):
    def __init__(self, config: WanDiTConfig, linear_factory: LinearFactory) -> None:
        super().__init__(config, linear_factory)
        if config.has_sla_proj:
            self.attn_op = SLAParameters(config.head_dim)

    @property
    def proj_l(self) -> nn.Module | None:
        return self.attn_op.local_attn.proj_l if hasattr(self, "attn_op") else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn, ops: BlockOps
    ) -> torch.Tensor:
        q = ops.rms_norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps, cos, sin)
        k = ops.rms_norm_rope(self.k(x), self.norm_k.weight, self.norm_k.eps, cos, sin)
        v = self.v(x)
        q, k, v = (h.unflatten(-1, (self.num_heads, -1)) for h in (q, k, v))
        return self.o(attention(q, k, v, proj_l=self.proj_l).flatten(2))


class CrossAttention(AttentionProjections):
    def forward(
        self, x: torch.Tensor, context: torch.Tensor, attention: AttentionFn, ops: BlockOps
    ) -> torch.Tensor:
        q = ops.rms_norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps)
        k = ops.rms_norm_rope(self.k(context), self.norm_k.weight, self.norm_k.eps)
        v = self.v(context)
        q, k, v = (h.unflatten(-1, (self.num_heads, -1)) for h in (q, k, v))
        return self.o(attention(q, k, v).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, config: WanDiTConfig, linear_factory: LinearFactory) -> None:
        super().__init__()
        self.eps = config.eps
        self.modulation = nn.Parameter(torch.zeros(1, 6, config.dim))
        self.self_attn = SelfAttention(config, linear_factory)
        self.norm3 = AffineLayerNorm(config.dim, config.eps)
        self.cross_attn = CrossAttention(config, linear_factory)
        self.ffn = nn.Sequential(
            linear_factory(config.dim, config.ffn_dim),
            nn.GELU(approximate="tanh"),
            linear_factory(config.ffn_dim, config.dim),
        )

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFunctions,
        ops: BlockOps,
    ) -> torch.Tensor:
        modulation = (self.modulation.float() + e0).chunk(6, dim=1)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = modulation
        fp8_sa, fp8_cross, fp8_ffn = self.fp8_inputs(x.dtype)
        # Each intermediate of L x dim (or L x ffn_dim) rows is released as soon as its last reader has run
        # (`del`): a name left bound keeps the tensor alive through the later, larger stages (the FFN is the
        # peak), which is what block swap's activation estimate and a 24 GiB card cannot afford.
        attention_input = ops.modulated_norm(x, shift_sa, scale_sa, self.eps, fp8=fp8_sa)
        attended = self.self_attn(attention_input, cos, sin, attention.self_attention, ops)
        del attention_input
        x, cross_input = ops.add_and_norm(
            x,
            attended,
            gate_sa,
            self.norm3.eps,
            weight=self.norm3.weight,
            bias=self.norm3.bias,
            fp8=fp8_cross,
        )
        del attended
        attended = self.cross_attn(cross_input, context, attention.cross_attention, ops)
        del cross_input
        x, ffn_input = ops.add_and_norm(
            x, attended, None, self.eps, shift=shift_ff, scale=scale_ff, fp8=fp8_ffn
        )
        del attended
        hidden = ops.linear_gelu(self.ffn[0], ffn_input)
        del ffn_input
        update = self.ffn[2](hidden)
        del hidden
        return ops.gated_add(x, update, gate_ff)

    def fp8_inputs(self, dtype: torch.dtype) -> tuple[bool, bool, bool]:
        """Whether the rows read by self-attention's q/k/v, cross-attention's q and the FFN up-projection
        are to be quantised once by the norm producing them (every reader an fp8 W8A8 linear)."""
        attn, cross = self.self_attn, self.cross_attn
        return (
            takes_fp8_activations((attn.q, attn.k, attn.v), dtype),
            takes_fp8_activations((cross.q,), dtype),
            takes_fp8_activations((self.ffn[0],), dtype),
        )


class Head(nn.Module):
    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, config.out_dim * config.patch_volume)
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Float32 output [B, L, patch_volume * out_dim]; uses the time embedding e, not its projection."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return linear_fp32(self.head, layer_norm(x, self.eps).float() * (1 + scale) + shift)


class WanDiT(nn.Module):
    """Wan DiT: `model(x, t, context, y=None)` -> float32 velocity [B, out_dim, T, H, W].

    x: latent [B, 16, T, H, W]; t: [B] flow time on the 0-1000 scale, used as given (the sampler rounds it);
    context: text features [B, 512, text_dim]; y: image conditioning [B, in_dim - 16, T, H, W], required by
    image-to-video models (in_dim 36) and refused by text-to-video ones.
    """

    def __init__(
        self,
        config: WanDiTConfig,
        *,
        self_attention: AttentionFn,
        cross_attention: AttentionFn,
        linear_factory: LinearFactory = nn.Linear,
        block_ops: BlockOps = TORCH_BLOCK_OPS,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention = AttentionFunctions(self_attention, cross_attention)
        self.block_ops = block_ops
        self.forward_runner: ForwardRunner | None = None
        self.rope = RopeTable(config.head_dim)
        self.source: str | None = None  # the checkpoint the weights came from, for error messages
        dim = config.dim
        self.patch_embedding = nn.Linear(config.in_dim * config.patch_volume, dim)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config, linear_factory) for _ in range(config.num_layers))
        self.head = Head(config)

    @property
    def kind(self) -> str:
        """Either "t2v" or "i2v" (a Wan2.2 A14B expert, taking 20 image-conditioning channels)."""
        return self.config.kind

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def set_self_attention(self, fn: AttentionFn) -> None:
        """Swap the self-attention core (e.g. per sampling run); cross-attention stays as it is."""
        self.attention = dataclasses.replace(self.attention, self_attention=fn)

    def set_block_ops(self, ops: BlockOps) -> None:
        """Swap the norm / RoPE / residual implementation (e.g. PyTorch ops for torch.compile to fuse)."""
        self.block_ops = ops

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_inputs(x, t, context, y)
        if self.forward_runner is not None:
            return self.forward_runner(x, t, context, y)
        return self.compute(x, t, context, y)

    def compute(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The forward pass itself, eagerly, on inputs `forward` has checked."""
        dtype = self.compute_dtype
        x = x.to(dtype) if y is None else torch.cat([x.to(dtype), y.to(dtype)], dim=1)
        grid = tuple(size // patch for size, patch in zip(x.shape[2:], self.config.patch_size))
        tokens = self.patch_embedding(patchify(x, self.config.patch_size))

        time_features = sinusoidal_time_features(t.reshape(-1).expand(x.shape[0]), self.config.freq_dim)
        e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], time_features)))
        e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        text = self.text_embedding(context.to(dtype))
        cos, sin = self.rope(grid, x.device)

        for block in self.blocks:
            tokens = block(tokens, e0, text, cos, sin, self.attention, self.block_ops)
        return unpatchify(self.head(tokens, e), grid, self.config.patch_size, self.config.out_dim)

    def _apply(self, fn, recurse=True):
        # Moving or casting the weights invalidates what a runner captured (CUDA graphs hold pointers).
        if self.forward_runner is not None:
            self.forward_runner.reset()
        return super()._apply(fn, recurse)

    def _check_inputs(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None
    ) -> None:
        config = self.config
        if x.dim() != 5 or x.shape[1] != config.out_dim:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; the Wan DiT expects a latent [B, {config.out_dim}, T, H, W]"
            )
        batch, _, frames, height, width = x.shape
        pt, ph, pw = config.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"latent size T={frames}, H={height}, W={width} is not divisible by the patch size "
                f"{config.patch_size}; use image sizes that are multiples of 16"
            )
        if config.kind == "i2v" and y is None:
            raise ValueError(
                f"this is an image-to-video model (in_dim {config.in_dim}); pass y, the "
                f"{config.condition_dim}-channel image conditioning"
            )
        if config.kind == "t2v" and y is not None:
            raise ValueError(
                f"this is a text-to-video model (in_dim {config.in_dim}); it takes no image conditioning y"
            )
        y_shape = (batch, config.condition_dim, frames, height, width)
        if y is not None and tuple(y.shape) != y_shape:
            raise ValueError(f"y has shape {tuple(y.shape)}; expected {y_shape}")
        if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != config.text_dim:
            raise ValueError(
                f"context has shape {tuple(context.shape)}; expected [{batch}, 512, {config.text_dim}] "
                f"text-encoder features"
            )
        if t.numel() not in (1, batch):
            raise ValueError(f"t has {t.numel()} values for a batch of {batch}; pass one time per sample")


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, L, C*pt*ph*pw]: tokens in (t, h, w) order, features in (c, kt, kh, kw) order."""
    batch, channels, frames, height, width = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(batch, channels, frames // pt, pt, height // ph, ph, width // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(batch, -1, channels * pt * ph * pw)


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """[B, L, pt*ph*pw*C] with features in (kt, kh, kw, c) order -> [B, C, T, H, W]."""
    frames, rows, columns = grid
    pt, ph, pw = patch_size
    x = tokens.reshape(tokens.shape[0], frames, rows, columns, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(tokens.shape[0], channels, frames * pt, rows * ph, columns * pw)
