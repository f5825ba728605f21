"""The normalisation and residual steps of a Wan block, injected into `WanDiT` like its attention (issue 8).

A `BlockOps` holds five functions; the block calls them at TurboDiffusion's rounding points
(TURBODIFFUSION.md §2.5-2.7, §2.11), x being the residual stream [B, L, C] in its dtype T:

* `modulated_norm(x, shift, scale, eps)` = T(float32(T(LN(x)))·(1 + scale) + shift): norm1 / norm2 with the
  modulation, the LayerNorm (no affine, float32) rounded to T before the float32 modulation.
* `add_and_norm(x, y, gate, eps, weight=, bias=, shift=, scale=)` = (x', norm(x')) with x' = x + y·T(gate)
  (T operations; gate None adds y alone) and norm the affine LayerNorm T(LN(x')·weight + bias) (norm3) or
  the modulated one above: a residual add fused with the norm that reads its result.
* `gated_add(x, y, gate)` = x + y·T(gate) in T operations (the last residual of a block).
* `rms_norm_rope(x, weight, eps, cos=None, sin=None)` = T(float32(x)·rsqrt(mean(x²) + eps)·weight) over whole
  rows (all heads), then with cos/sin [L, D/2] the interleaved RoPE of every head in float32, rounded to T.
* `linear_gelu(layer, x)` = GELU_tanh(layer(x)): the FFN up-projection and Wan's activation
  (`nn.GELU(approximate="tanh")`), each rounded to T.

With `fp8=True`, `modulated_norm` and `add_and_norm` return the normalised rows as `Fp8Activations` (the
per-token e4m3 codes and scales the fp8 linears reading them would compute, `linear_layers`) instead of a
tensor: the block asks for that where every linear reading the rows is an fp8 W8A8 layer, so the rows are
quantised once, not once per linear.

`TORCH_BLOCK_OPS` are these in PyTorch operations (the model's default, on every device). `make_block_ops`
is the one place choosing an implementation: "auto" runs the fused Triton kernels of
`turbo_kernels.fused_norms` on CUDA GPUs where `plan_block_ops` allows them (decided per device, logged once;
if the kernels fail on their first call on a device, PyTorch takes over there, logged) and PyTorch elsewhere.
The fused kernels also quantise fp8 rows themselves on GPUs where the fp8 linears' Triton quantiser runs.

`linear_gelu` of the fused ops runs a dense bf16 / fp16 FFN up-projection on CUDA as one cuBLASLt GEMM with
the GELU in its epilogue (`torch._addmm_activation(..., use_gelu=True)`): on CUDA that is the tanh
approximation (PyTorch's fallback without cuBLASLt calls `gelu(..., "tanh")` to match; checked once per device
in float32, where tanh and erf GELU differ well above the float32 error). It is applied to the float32
accumulator plus bias and rounded to T once, where the unfused path rounds layer(x) to T first: the results
agree within one rounding of T. On the CPU `torch._addmm_activation` applies the exact (erf) GELU, another
function, so the CPU always runs the two operations. A quantised FFN up-projection whose GEMM applies the
GELU in its own epilogue (`fuses_gelu` of the layers in `linear_layers`: the Triton row-wise GEMM of the fp8
and int8 row-wise linears) gets `gelu=True` instead: bias and GELU on the float32 accumulator, one rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn

from .attention import installed_triton_version
from .linear_kernels import quantize_fp8_activations, triton_quantises_fp8_activations
from .linear_layers import QUANTISED_LINEARS, Fp8Activations
from .rope import apply_rope

BLOCK_OPS_CHOICES = ("auto", "torch", "triton")
MIN_TRITON = (3, 0)
MIN_CAPABILITY = (7, 5)
HALF_DTYPES = (torch.bfloat16, torch.float16)
# The epilogue's check: tanh and erf GELU differ by up to ~5e-4 on [-4, 4]; float32 evaluations of one of them
# agree to ~1e-6.
GELU_CHECK_TOLERANCE = 2e-5

logger = logging.getLogger(__name__)


def layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dim computed in float32, rounded to x's dtype."""
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).to(x.dtype)


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """normed * (1 + scale) + shift in float32, rounded to normed's dtype."""
    return (normed.float() * (1 + scale) + shift).to(normed.dtype)


def as_fp8_activations(normed: torch.Tensor) -> Fp8Activations:
    """Rows [..., C] quantised per token as the fp8 linears on their device do it."""
    codes, scale = quantize_fp8_activations(normed.reshape(-1, normed.shape[-1]))
    return Fp8Activations(codes, scale, normed.shape, normed.dtype)


def modulated_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, *, fp8: bool = False
) -> torch.Tensor | Fp8Activations:
    normed = modulate(layer_norm(x, eps), shift, scale)
    return as_fp8_activations(normed) if fp8 else normed


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
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Activations]:
    x = x + y if gate is None else gated_add(x, y, gate)
    if shift is not None:
        return x, modulated_norm(x, shift, scale, eps, fp8=fp8)
    normed = layer_norm(x, eps, weight, bias)
    return x, as_fp8_activations(normed) if fp8 else normed


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


def linear_gelu(layer: nn.Module, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
    return F.gelu(layer(x), approximate="tanh")


def gelu_epilogue_applies(layer: nn.Module, x: torch.Tensor | Fp8Activations) -> bool:
    """Whether `linear_gelu_epilogue` can run layer(x): a dense linear with a bias, bf16 / fp16 on CUDA."""
    if not isinstance(x, torch.Tensor) or type(layer) is not nn.Linear or layer.bias is None:
        return False
    same_dtype = layer.weight.dtype == layer.bias.dtype == x.dtype
    return x.device.type == "cuda" and x.dtype in HALF_DTYPES and same_dtype and x.is_contiguous()


def linear_gelu_epilogue(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(x·Wᵀ + b) as one cuBLASLt GEMM with the GELU epilogue (CUDA only; module docstring)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(layer.bias, flat, layer.weight.t(), use_gelu=True)
    return out.reshape(*x.shape[:-1], layer.out_features)


def gelu_epilogue_error(device: torch.device) -> float:
    """Largest |difference| of `torch._addmm_activation(..., use_gelu=True)` from the tanh GELU on a float32
    problem whose pre-activations (multiples of 1/8 in [-4, 4)) are exact in any matmul precision."""
    columns, depth = 64, 32
    identity = torch.eye(depth, device=device)
    steps = torch.arange(columns * depth, device=device, dtype=torch.float32) % 64
    weight = ((steps - 32) / 8).reshape(columns, depth)
    bias = torch.full((columns,), 0.125, device=device)
    fused = torch._addmm_activation(bias, identity, weight.t(), use_gelu=True)
    expected = F.gelu(weight.t() + bias, approximate="tanh")
    return (fused - expected).abs().max().item()


@dataclass(frozen=True)
class BlockOps:
    """The five normalisation / residual / FFN-activation functions of a block (contract in the module
    docstring)."""

    modulated_norm: Callable[..., torch.Tensor | Fp8Activations]
    add_and_norm: Callable[..., tuple[torch.Tensor, torch.Tensor | Fp8Activations]]
    gated_add: Callable[..., torch.Tensor]
    rms_norm_rope: Callable[..., torch.Tensor]
    linear_gelu: Callable[..., torch.Tensor]


TORCH_BLOCK_OPS = BlockOps(modulated_norm, add_and_norm, gated_add, rms_norm_rope, linear_gelu)


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
        self._gelu_epilogue: dict[torch.device, bool] = {}

    def as_block_ops(self) -> BlockOps:
        return BlockOps(
            self.modulated_norm, self.add_and_norm, self.gated_add, self.rms_norm_rope, self.linear_gelu
        )

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

    def _kernel_quantises(self, device: torch.device) -> bool:
        """Whether the LayerNorm kernel emits fp8 rows itself: where the fp8 linears use Triton's e4m3
        quantiser (the same conversion), and on the CPU interpreter (forced kernels, tests)."""
        return device.type != "cuda" or triton_quantises_fp8_activations(device)

    def _normed(self, kernels, x, fp8: bool, **options):
        """layer_norm_triton's normalised rows (after a residual, with one), as fp8 rows where asked."""
        in_kernel = fp8 and self._kernel_quantises(x.device)
        out = kernels.layer_norm_triton(x.contiguous(), quantize_e4m3=in_kernel, **options)
        updated, normed = out if "residual" in options else (None, out)
        if in_kernel:
            normed = Fp8Activations(*normed, x.shape, x.dtype)
        elif fp8:
            normed = as_fp8_activations(normed)
        return normed if updated is None else (updated, normed)

    def modulated_norm(self, x, shift, scale, eps, *, fp8=False):
        return self._run(
            x.device,
            lambda k: self._normed(k, x, fp8, eps=eps, shift=shift, scale=scale),
            lambda: modulated_norm(x, shift, scale, eps, fp8=fp8),
        )

    def add_and_norm(self, x, y, gate, eps, *, weight=None, bias=None, shift=None, scale=None, fp8=False):
        vectors = dict(weight=weight, bias=bias, shift=shift, scale=scale)
        return self._run(
            x.device,
            lambda k: self._normed(k, x, fp8, eps=eps, residual=y.contiguous(), gate=gate, **vectors),
            lambda: add_and_norm(x, y, gate, eps, fp8=fp8, **vectors),
        )

    def linear_gelu(self, layer, x):
        if isinstance(layer, QUANTISED_LINEARS) and layer.fuses_gelu(x):
            return layer(x, gelu=True)
        if gelu_epilogue_applies(layer, x) and self._epilogue_checked(x.device):
            return linear_gelu_epilogue(layer, x)
        return linear_gelu(layer, x)

    def _epilogue_checked(self, device: torch.device) -> bool:
        if device not in self._gelu_epilogue:
            try:
                error = gelu_epilogue_error(device)
                reason = (
                    f"differs from the tanh GELU by {error:.1e}" if error > GELU_CHECK_TOLERANCE else None
                )
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as failure:  # an old PyTorch or cuBLAS: keep the two operations
                reason = f"failed ({failure!r})"
            self._gelu_epilogue[device] = reason is None
            if reason is None:
                logger.info("block ops on %s: FFN up-projection with cuBLASLt's GELU epilogue", device)
            else:
                logger.warning("block ops on %s: cuBLASLt GELU epilogue %s; GEMM then GELU", device, reason)
        return self._gelu_epilogue[device]

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
