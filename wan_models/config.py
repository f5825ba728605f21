"""The Wan DiT hyper-parameters: one dataclass, the released presets, and inference from checkpoint shapes."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .checkpoint_io import CheckpointError

# Wan stores no head count; every released model uses 128-wide heads (TURBODIFFUSION.md §1.2).
HEAD_DIM = 128
I2V_IN_DIM = 36


@dataclass(frozen=True)
class WanDiTConfig:
    """Shape of a Wan 2.1 / 2.2 DiT. `has_sla_proj`: the TurboDiffusion SLA `proj_l` layers exist."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    has_sla_proj: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for the rotary embedding")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim {self.freq_dim} must be even (cosines and sines)")
        if self.in_dim < self.out_dim:
            raise ValueError(f"in_dim {self.in_dim} is smaller than out_dim {self.out_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def condition_dim(self) -> int:
        """Channels of the image conditioning `y` concatenated after the latent (0 for text-to-video)."""
        return self.in_dim - self.out_dim

    @property
    def kind(self) -> str:
        """Either "i2v", when the model takes image-conditioning channels, or "t2v"."""
        return "i2v" if self.condition_dim else "t2v"

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    @classmethod
    def from_name(cls, name: str, **overrides) -> WanDiTConfig:
        """A preset by name (see WAN_PRESETS), optionally with some fields replaced."""
        try:
            preset = WAN_PRESETS[name]
        except KeyError:
            choices = ", ".join(WAN_PRESETS)
            raise ValueError(f"unknown Wan DiT preset {name!r}; choose one of {choices}") from None
        return dataclasses.replace(preset, **overrides)


WAN_PRESETS: dict[str, WanDiTConfig] = {
    "wan2.1-t2v-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.2-i2v-a14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=I2V_IN_DIM),
}

_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> WanDiTConfig:
    """The config of a DiT state dict in the original key names (no prefix), from tensor shapes alone.

    Works on meta tensors. Accepts the 5-D Conv3d and the 2-D Linear patch embedding, dense and int8
    (`-quant`) block linears, with or without the SLA `proj_l` layers.
    """
    dim = _shape(state, "patch_embedding.bias")[0]
    patch_weight = _shape(state, "patch_embedding.weight")
    head_rows = _shape(state, "head.head.weight")[0]
    if len(patch_weight) == 5:
        in_dim, patch_size = patch_weight[1], tuple(patch_weight[2:])
    elif len(patch_weight) == 2:
        # The Linear form does not record the patch shape; every Wan model uses (1, 2, 2).
        patch_size = (1, 2, 2)
        in_dim = patch_weight[1] // math.prod(patch_size)
    else:
        raise CheckpointError(f"patch_embedding.weight has shape {patch_weight}; expected 2-D or 5-D")
    ffn_key = (
        "blocks.0.ffn.0.int8_weight" if "blocks.0.ffn.0.int8_weight" in state else "blocks.0.ffn.0.weight"
    )
    layers = {int(match.group(1)) for key in state if (match := _BLOCK_INDEX.match(key))}
    if not layers:
        raise CheckpointError("the state dict has no transformer blocks (no 'blocks.N.' keys)")
    if dim % HEAD_DIM:
        raise CheckpointError(f"hidden size {dim} is not a multiple of the Wan head size {HEAD_DIM}")
    return WanDiTConfig(
        dim=dim,
        ffn_dim=_shape(state, ffn_key)[0],
        num_heads=dim // HEAD_DIM,
        num_layers=max(layers) + 1,
        in_dim=in_dim,
        out_dim=head_rows // math.prod(patch_size),
        text_dim=_shape(state, "text_embedding.0.weight")[1],
        freq_dim=_shape(state, "time_embedding.0.weight")[1],
        patch_size=patch_size,
        has_sla_proj="blocks.0.self_attn.attn_op.local_attn.proj_l.weight" in state,
    )


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"the state dict lacks {key!r}, which every Wan DiT has")
    return tuple(state[key].shape)
