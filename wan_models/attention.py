"""The single attention entry point of the Wan DiT.

Every attention function takes q, k, v in (B, L, H, D) layout and returns (B, L, H, D) in q's dtype.
Self-attention functions also receive the layer's SLA `proj_l` module (None when the checkpoint has none).
`make_self_attention` maps a backend name to a function; `plan_attention` is the one place that decides which
implementation runs on a device and why (fallbacks are logged once per attention function).

Backends (TURBODIFFUSION.md §9-10):
* `sdpa`: dense softmax attention (PyTorch SDPA).
* `sla`: top-k block-sparse softmax branch + linear branch through proj_l; Triton bf16 kernels on a CUDA GPU
  (block sizes 128/64 as TurboDiffusion's `sla`).
* `sagesla`: the same with the quantised sparse branch (INT8 Q·Kᵀ, FP8 P·V; fp16 P·V on Ampere); Triton
  kernels on a CUDA GPU with the per-architecture block sizes.
Without a CUDA GPU, without a usable Triton, on GPUs older than Ampere or for head dims other than 64/128 both
run their PyTorch reference (`turbo_kernels.sla_reference`; for `sagesla` an emulation of the quantised
numerics, slow). A checkpoint without `proj_l` runs the sparse branch alone (proj_l is zero-initialised before
SLA fine-tuning, so this is what an untrained module computes) and logs that it was not trained for SLA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import torch
import torch.nn.functional as F

from ..turbo_kernels.sla_reference import (
    SageRecipe,
    sage_recipe,
    sagesla_attention_reference,
    sla_attention_reference,
)

AttentionFn = Callable[..., torch.Tensor]
SELF_ATTENTION_BACKENDS = ("sdpa", "sla", "sagesla")
MIN_TRITON = (3, 2)
KERNEL_HEAD_DIMS = (64, 128)

logger = logging.getLogger(__name__)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l: torch.nn.Module | None = None
) -> torch.Tensor:
    """Dense softmax attention, scale 1/sqrt(D), no mask. `proj_l` is ignored."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@dataclass(frozen=True)
class AttentionPlan:
    """Which implementation of a backend runs on a device: `path` is "triton" or "reference"."""

    backend: str
    path: str
    recipe: SageRecipe | None
    reason: str


def installed_triton_version() -> tuple[int, int] | None:
    """(major, minor) of the importable Triton (any distribution, e.g. triton-windows), None when missing."""
    try:
        triton = import_module("triton")
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except (ImportError, AttributeError, ValueError):
        return None


def plan_attention(
    backend: str,
    device: torch.device,
    head_dim: int,
    *,
    triton_version: tuple[int, int] | None,
    capability: tuple[int, int] | None,
) -> AttentionPlan:
    """The one place deciding the implementation of `sla` / `sagesla` on a device (pure function)."""
    reference_recipe = sage_recipe(capability) if backend == "sagesla" else None

    def reference(reason: str) -> AttentionPlan:
        return AttentionPlan(backend, "reference", reference_recipe, reason)

    if device.type != "cuda" or capability is None:
        return reference(f"no CUDA GPU ({device.type}): {backend} runs its PyTorch reference (slow)")
    if triton_version is None:
        return reference(f"Triton is not installed: {backend} runs its PyTorch reference (slow)")
    if triton_version < MIN_TRITON:
        found = ".".join(map(str, triton_version))
        need = ".".join(map(str, MIN_TRITON))
        return reference(
            f"Triton {found} is older than {need}: {backend} runs its PyTorch reference; upgrade"
        )
    if capability < (8, 0):
        return reference(
            f"sm{capability[0]}{capability[1]} is older than Ampere: {backend} runs its PyTorch reference"
        )
    if head_dim not in KERNEL_HEAD_DIMS:
        return reference(
            f"head dim {head_dim} has no Triton kernel (64 or 128): {backend} runs its PyTorch reference"
        )
    if backend == "sla":
        return AttentionPlan(backend, "triton", None, "Triton bf16 block-sparse kernels")
    recipe = sage_recipe(capability)
    if recipe.pv_dtype == "fp16":
        reason = "Triton INT8 Q·K with fp16 P·V (no FP8 on Ampere in Triton)"
    else:
        reason = f"Triton INT8 Q·K with FP8 P·V, blocks {recipe.blkq}/{recipe.blkk}"
    return AttentionPlan(backend, "triton", recipe, reason)


class SparseLinearSelfAttention:
    """`sla` / `sagesla` self-attention: callable as fn(q, k, v, proj_l=None) on (B, L, H, D) tensors."""

    def __init__(self, backend: str, sla_topk: float):
        self.backend = backend
        self.sla_topk = sla_topk
        self._plans: dict[tuple[str, int | None, int], AttentionPlan] = {}
        self._working: set[tuple[str, int | None, int]] = set()
        self._said: set[str] = set()

    def _say_once(self, level: int, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            logger.log(level, message)

    def _plan(self, device: torch.device, head_dim: int) -> tuple[tuple[str, int | None, int], AttentionPlan]:
        key = (device.type, device.index, head_dim)
        if key not in self._plans:
            is_cuda = device.type == "cuda" and torch.cuda.is_available()
            capability = torch.cuda.get_device_capability(device) if is_cuda else None
            plan = plan_attention(
                self.backend,
                device,
                head_dim,
                triton_version=installed_triton_version() if is_cuda else None,
                capability=capability,
            )
            self._plans[key] = plan
            level = logging.INFO if plan.path == "triton" else logging.WARNING
            self._say_once(level, f"attention {self.backend} on {device}: {plan.reason}")
        return key, self._plans[key]

    def _run_triton(self, plan: AttentionPlan, q, k, v, proj_l) -> torch.Tensor:
        kernels = import_module("..turbo_kernels.sla_triton", __package__)
        if plan.backend == "sla":
            return kernels.sla_attention_triton(q, k, v, proj_l, self.sla_topk)
        return kernels.sagesla_attention_triton(q, k, v, proj_l, self.sla_topk, plan.recipe)

    # Compiled models call this as an opaque function: its plan cache, fallbacks and kernel launches are
    # plain Python that torch.compile need not trace.
    @torch.compiler.disable
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l: torch.nn.Module | None = None
    ) -> torch.Tensor:
        if proj_l is None:
            self._say_once(
                logging.WARNING,
                f"attention {self.backend}: the checkpoint has no SLA proj_l weights (not trained for SLA); "
                "running the sparse branch alone. Use attention='sdpa' for checkpoints without SLA.",
            )
        key, plan = self._plan(q.device, q.shape[-1])
        if plan.path == "triton":
            try:
                out = self._run_triton(plan, q, k, v, proj_l)
                self._working.add(key)
                return out
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # the first call compiles the kernels; a failure there means this
                if key in self._working:  # GPU/Triton pair cannot build them, later failures are real errors
                    raise
                plan = AttentionPlan(
                    plan.backend, "reference", plan.recipe, f"Triton kernels failed: {error}"
                )
                self._plans[key] = plan
                self._say_once(logging.WARNING, f"attention {self.backend} on {q.device}: {plan.reason}")
        if plan.backend == "sla":
            return sla_attention_reference(q, k, v, proj_l, self.sla_topk)
        return sagesla_attention_reference(q, k, v, proj_l, self.sla_topk, plan.recipe)


def make_self_attention(name: str = "sdpa", sla_topk: float = 0.1) -> AttentionFn:
    """The self-attention function for a backend name ("sdpa", "sla" or "sagesla") and top-k ratio."""
    if name not in SELF_ATTENTION_BACKENDS:
        choices = ", ".join(SELF_ATTENTION_BACKENDS)
        raise ValueError(f"unknown attention backend {name!r}; choose one of {choices}")
    if not 0.0 <= sla_topk <= 1.0:
        raise ValueError(
            f"sla_topk is the fraction of key blocks each query block attends to; got {sla_topk}"
        )
    if name == "sdpa":
        return sdpa_attention
    return SparseLinearSelfAttention(name, sla_topk)
