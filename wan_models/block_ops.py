"""The normalisation and residual steps of a Wan block, injected into `WanDiT` like its attention (issue 8).

A `BlockOps` holds four functions; the block calls them at TurboDiffusion's rounding points
(TURBODIFFUSION.md §2.5-2.7, §2.11), x being the residual stream [B, L, C] in its dtype T:

* `modulated_norm(x, shift, scale, eps)` = T(float32(T(LN(x)))·(1 + scale) + shift): norm1 / norm2 with the
  modulation, the LayerNorm (no affine, float32) rounded to T before the float32 modulation.
* `add_and_norm(x, y, gate, eps, weight=, bias=, shift=, scale=)` = (x', norm(x')) with x' = x + y·T(gate)
  (T operations; gate None adds y alone) and norm the affine LayerNorm T(LN(x')·weight + bias) (norm3) or
  the modulated one above: a residual add fused with the norm that reads its result.
* `gated_add(x, y, gate)` = x + y·T(gate) in T operations (the last residual of a block).
* `rms_norm_rope(x, weight, eps, cos=None, sin=None)` = T(float32(x)·rsqrt(mean(x²) + eps)·weight) over whole
  rows (all heads), then with cos/sin [L, D/2] the interleaved RoPE of every head in float32, rounded to T.

`TORCH_BLOCK_OPS` are these in PyTorch operations (the model's default, on every device). `make_block_ops`
is the one place choosing an implementation: "auto" runs the fused Triton kernels of
`turbo_kernels.fused_norms` on CUDA GPUs where `plan_block_ops` allows them (decided per device, logged once;
if the kernels fail on their first call on a device, PyTorch takes over there, logged) and PyTorch elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import torch
import torch.nn.functional as F

from .attention import installed_triton_version
from .rope import apply_rope

BLOCK_OPS_CHOICES = ("auto", "torch", "triton")
MIN_TRITON = (3, 0)
MIN_CAPABILITY = (7, 5)

logger = logging.getLogger(__name__)


def layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dim computed in float32, rounded to x's dtype."""
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).to(x.dtype)


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """normed * (1 + scale) + shift in float32, rounded to normed's dtype."""
    return (normed.float() * (1 + scale) + shift).to(normed.dtype)


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return modulate(layer_norm(x, eps), shift, scale)


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x + y * gate.to(x.dtype)


def add_and_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    eps: float,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + y if gate is None else gated_add(x, y, gate)
    if shift is not None:
        return x, modulated_norm(x, shift, scale, eps)
    return x, layer_norm(x, eps, weight, bias)


def rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    normed = (normed * weight.float()).to(x.dtype)
    if cos is None:
        return normed
    return apply_rope(normed.unflatten(-1, (-1, 2 * cos.shape[1])), cos, sin).flatten(-2)


@dataclass(frozen=True)
class BlockOps:
    """The four normalisation / residual functions of a block (contract in the module docstring)."""

    modulated_norm: Callable[..., torch.Tensor]
    add_and_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    gated_add: Callable[..., torch.Tensor]
    rms_norm_rope: Callable[..., torch.Tensor]


TORCH_BLOCK_OPS = BlockOps(modulated_norm, add_and_norm, gated_add, rms_norm_rope)


def plan_block_ops(
    device: torch.device, triton_version: tuple[int, int] | None, capability: tuple[int, int] | None
) -> tuple[str, str]:
    """("triton" or "torch", reason) for the fused kernels on a device (pure function)."""
    if device.type != "cuda" or capability is None:
        return "torch", f"no CUDA GPU ({device.type}): block norms and residuals run in PyTorch"
    if triton_version is None or triton_version < MIN_TRITON:
        return "torch", "Triton >= 3.0 is not installed: block norms and residuals run in PyTorch (slower)"
    if capability < MIN_CAPABILITY:
        return "torch", f"sm{capability[0]}{capability[1]}: block norms and residuals run in PyTorch"
    return "triton", "fused Triton kernels for block norms, RoPE and residuals"


class FusedBlockOps:
    """`BlockOps` on the fused kernels where planned (everywhere with `force`), PyTorch elsewhere."""

    def __init__(self, force: bool = False) -> None:
        self.force = force
        self._paths: dict[torch.device, str] = {}
        self._working: set[torch.device] = set()

    def as_block_ops(self) -> BlockOps:
        return BlockOps(self.modulated_norm, self.add_and_norm, self.gated_add, self.rms_norm_rope)

    def _path(self, device: torch.device) -> str:
        if device not in self._paths:
            if self.force:
                path, reason = "triton", "fused Triton kernels (forced)"
            else:
                is_cuda = device.type == "cuda" and torch.cuda.is_available()
                capability = torch.cuda.get_device_capability(device) if is_cuda else None
                triton_version = installed_triton_version() if is_cuda else None
                path, reason = plan_block_ops(device, triton_version, capability)
            self._paths[device] = path
            level = logging.INFO if path == "triton" or device.type != "cuda" else logging.WARNING
            logger.log(level, "block ops on %s: %s", device, reason)
        return self._paths[device]

    def _run(self, device: torch.device, fused: Callable, reference: Callable):
        if self._path(device) == "triton":
            try:
                out = fused(import_module("..turbo_kernels.fused_norms", __package__))
                self._working.add(device)
                return out
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # the first call compiles the kernels: a failure there means this
                if device in self._working or self.force:  # GPU/Triton pair cannot build them
                    raise
                self._paths[device] = "torch"
                logger.warning("block ops on %s: fused kernels failed (%s); using PyTorch", device, error)
        return reference()

    def modulated_norm(self, x, shift, scale, eps):
        return self._run(
            x.device,
            lambda k: k.layer_norm_triton(x.contiguous(), eps, shift=shift, scale=scale),
            lambda: modulated_norm(x, shift, scale, eps),
        )

    def add_and_norm(self, x, y, gate, eps, *, weight=None, bias=None, shift=None, scale=None):
        return self._run(
            x.device,
            lambda k: k.layer_norm_triton(
                x.contiguous(),
                eps,
                residual=y.contiguous(),
                gate=gate,
                weight=weight,
                bias=bias,
                shift=shift,
                scale=scale,
            ),
            lambda: add_and_norm(x, y, gate, eps, weight=weight, bias=bias, shift=shift, scale=scale),
        )

    def gated_add(self, x, y, gate):
        return self._run(
            x.device,
            lambda k: k.gated_add_triton(x.contiguous(), y.contiguous(), gate),
            lambda: gated_add(x, y, gate),
        )

    def rms_norm_rope(self, x, weight, eps, cos=None, sin=None):
        return self._run(
            x.device,
            lambda k: k.rms_norm_rope_triton(x.contiguous(), weight, eps, cos, sin),
            lambda: rms_norm_rope(x, weight, eps, cos, sin),
        )


def make_block_ops(kind: str = "auto") -> BlockOps:
    """ "torch": PyTorch everywhere; "auto": fused kernels on suitable CUDA GPUs (see `plan_block_ops`);
    "triton": fused kernels on every device (CPU tensors only under TRITON_INTERPRET=1, for tests)."""
    if kind not in BLOCK_OPS_CHOICES:
        raise ValueError(f"unknown block ops {kind!r}; choose one of {', '.join(BLOCK_OPS_CHOICES)}")
    if kind == "torch":
        return TORCH_BLOCK_OPS
    return FusedBlockOps(force=kind == "triton").as_block_ops()
