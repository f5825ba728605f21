"""The one place deciding which implementation runs the quantised linears on a device.

* int8 W8A8 (`Int8Linear`): the Triton kernels of `turbo_kernels.int8_gemm` on CUDA GPUs of compute
  capability >= 8.0 with Triton >= 3.2; the exact PyTorch path of `turbo_kernels.w8a8_reference` elsewhere.
* fp8 W8A8 (`Fp8Linear`): the row-wise Triton GEMM of `turbo_kernels.rowwise_gemm` where
  `rowwise_gemm_capable` allows it (FP8 tensor cores, Triton >= 3.4), with the bias and, on request, the
  FFN's GELU-tanh applied once in float32 in its epilogue; else `torch._scaled_mm` on GPUs with FP8 tensor
  cores (>= 8.9); the activations of both quantised by the Triton kernel of `turbo_kernels.fp8_quant`
  (checked bit for bit against the PyTorch quantiser first; PyTorch's is kept otherwise); the float32
  reference of `turbo_kernels.fp8_linear` elsewhere.
* int8 row-wise W8A8 (`Int8RowwiseLinear`, opt-in, KERNELS.md §4.6 "fast path"): per-token int8 activation
  codes (`quantize_rows_int8_triton`) and the row-wise Triton GEMM (int32 over the whole K, scales, bias and
  GELU once in float32) where `rowwise_gemm_capable` allows it; elsewhere `int8_rowwise_reference`, the
  same formula in PyTorch (the sum exact in float64, then the kernel's float32 epilogue). It needs Triton
  installed even on the CPU (its quantisers live in `turbo_kernels.rowwise_gemm`).

A fast path is checked once per device against its reference on a small random problem before it is used;
if it fails or disagrees (a Triton or driver version this was not tested with), the next path in that order
runs instead and the reason is logged once.

`gelu=True` asks for GELU_tanh(x·Wᵀ + b): in the Triton epilogue where that runs, else on the float32 value
before the one rounding to the output dtype (reference) or after the GEMM (`_scaled_mm`, which has no GELU
epilogue); `fp8_gemm_fuses_gelu` says where it costs nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
import torch.nn.functional as F

from ..turbo_kernels.fp8_linear import (
    E4M3,
    SCALED_MM_MIN_CAPABILITY,
    fp8_linear,
    fp8_linear_quantized,
    fp8_matmul_reference,
    quantize_rows_e4m3,
)
from ..turbo_kernels.w8a8_reference import quantize_tiles, w8a8_linear

logger = logging.getLogger(__name__)

MIN_TRITON = (3, 2)
MIN_INT8_CAPABILITY = (8, 0)
# Self-check problem: ragged M and two K tiles, bf16 like the model's activations.
CHECK_SHAPE = (200, 256, 384)  # M, K, N
FAST_FP8_PATHS = ("triton", "scaled_mm")
# Fast and reference paths may differ by one bf16 rounding (FMA accumulation); allow two bf16 ulps.
CHECK_RELATIVE_TOLERANCE = 2**-7


@dataclass(frozen=True)
class LinearPlan:
    """`path` is "triton", "scaled_mm" or "reference"; `reason` says why, for the log."""

    path: str
    reason: str


def plan_int8(
    device: torch.device, triton_version: tuple[int, int] | None, capability: tuple[int, int] | None
) -> LinearPlan:
    """Which int8 W8A8 implementation suits a device (pure; the self-check comes on top)."""
    if device.type != "cuda" or capability is None:
        return LinearPlan("reference", f"int8 linears on {device.type}: exact PyTorch W8A8 path")
    if triton_version is None or triton_version < MIN_TRITON:
        return LinearPlan(
            "reference", "int8 linears: Triton >= 3.2 is not installed, using the PyTorch W8A8 path (slow)"
        )
    if capability < MIN_INT8_CAPABILITY:
        return LinearPlan(
            "reference",
            f"int8 linears: sm{capability[0]}{capability[1]} has no int8 tensor-core path in Triton; "
            f"using the PyTorch W8A8 path (slow)",
        )
    return LinearPlan("triton", "int8 linears: Triton W8A8 kernels")


def plan_fp8(
    device: torch.device,
    capability: tuple[int, int] | None,
    triton_version: tuple[int, int] | None = None,
) -> LinearPlan:
    """Which fp8 implementation suits a device (pure; the self-check comes on top): the Triton row-wise GEMM
    where Triton can run it, else `_scaled_mm` (`triton_version` None: Triton is not installed)."""
    if device.type != "cuda" or capability is None:
        return LinearPlan("reference", f"fp8 linears on {device.type}: float32 reference path")
    if capability < SCALED_MM_MIN_CAPABILITY:
        return LinearPlan(
            "reference",
            f"fp8 linears: sm{capability[0]}{capability[1]} has no FP8 tensor cores; float32 reference path "
            f"(slow; prefer int8 on this GPU)",
        )
    if triton_version is not None and _rowwise_capable(capability, triton_version, E4M3):
        return LinearPlan("triton", "fp8 linears: Triton row-wise GEMM (bias and GELU in its epilogue)")
    return LinearPlan("scaled_mm", "fp8 linears: torch._scaled_mm with row-wise scales")


def _rowwise_capable(
    capability: tuple[int, int], triton_version: tuple[int, int], code_dtype: torch.dtype
) -> bool:
    from ..turbo_kernels.rowwise_gemm import rowwise_gemm_capable  # imports Triton

    return rowwise_gemm_capable(capability, triton_version, code_dtype)


@torch.compiler.disable  # opaque to torch.compile (path choice and self-check are plain Python)
def int8_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8 int8 linear of a 2-D x on the fastest path that passed its self-check on x's device."""
    if _int8_path(x.device) == "triton":
        from ..turbo_kernels.int8_gemm import w8a8_linear_triton

        return w8a8_linear_triton(x, codes, scale, bias)
    return w8a8_linear(x, codes, scale, bias)


def plan_int8_rowwise(
    device: torch.device, triton_version: tuple[int, int] | None, capability: tuple[int, int] | None
) -> LinearPlan:
    """Which int8 row-wise implementation suits a device (pure; the self-check comes on top)."""
    if device.type != "cuda" or capability is None:
        return LinearPlan("reference", f"int8 row-wise linears on {device.type}: PyTorch reference path")
    if triton_version is None or not _rowwise_capable(capability, triton_version, torch.int8):
        return LinearPlan(
            "reference",
            f"int8 row-wise linears: the Triton row-wise GEMM needs Triton >= 3.4 and sm80+ (found "
            f"{triton_version}, sm{capability[0]}{capability[1]}); PyTorch reference path (slow)",
        )
    return LinearPlan("triton", "int8 row-wise linears: Triton row-wise GEMM (bias and GELU in its epilogue)")


@torch.compiler.disable  # opaque to torch.compile (path choice and self-check are plain Python)
def int8_rowwise_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
) -> torch.Tensor:
    """Row-wise int8 W8A8 linear of a 2-D x (codes [N, K] int8, scale [N] float32), then GELU-tanh if `gelu`,
    on the Triton GEMM where it passed its self-check on x's device and x is bf16 (its output dtype)."""
    if x.dtype == torch.bfloat16 and _int8_rowwise_path(x.device) == "triton":
        from ..turbo_kernels.rowwise_gemm import rowwise_linear

        return rowwise_linear(x, codes, scale, bias, gelu)
    return int8_rowwise_reference(x, codes, scale, bias, gelu)


def int8_rowwise_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
) -> torch.Tensor:
    """The row-wise W8A8 formula in PyTorch: x quantised per token (`quantize_rows_int8`), Σ_k codes exactly
    (float64 holds |Σ| < 2³¹ exactly), converted to float32, × s_x[m] × s_w[n] (+ bias) (GELU-tanh) in
    float32, rounded to x's dtype once."""
    from ..turbo_kernels.rowwise_gemm import quantize_rows_int8

    x_codes, x_scale = quantize_rows_int8(x)
    product = (x_codes.double() @ codes.double().T).float() * x_scale[:, None] * scale[None, :]
    return float32_epilogue(product, bias, gelu, x.dtype)


def int8_rowwise_fuses_gelu(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an int8 row-wise linear with inputs of `dtype` on `device` applies GELU in its GEMM."""
    return _runs_triton_gemm(_int8_rowwise_path, device, dtype)


@torch.compiler.disable  # opaque to torch.compile (path choice and self-check are plain Python)
def fp8_w8a8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
) -> torch.Tensor:
    """FP8 W8A8 linear of a 2-D x (then GELU-tanh if `gelu`) on the fastest path that passed its
    self-check on x's device."""
    x_codes, x_scale = quantize_fp8_activations(x)
    return fp8_w8a8_linear_quantized(x_codes, x_scale, x.dtype, codes, scale, bias, gelu)


@torch.compiler.disable
def quantize_fp8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 codes and scales of a 2-D x, as the fp8 linears on x's device quantise their input:
    the Triton quantiser where the fast path runs and the quantiser passed its check, PyTorch's elsewhere
    (the same numbers either way)."""
    if _fp8_path(x.device) in FAST_FP8_PATHS:
        return _fp8_quantizer(x.device)(x)
    return quantize_rows_e4m3(x)


@torch.compiler.disable
def fp8_w8a8_linear_quantized(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    out_dtype: torch.dtype,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
) -> torch.Tensor:
    """`fp8_w8a8_linear` of activations quantised beforehand (`quantize_fp8_activations` or a kernel
    emitting the same codes and scales)."""
    path = _fp8_path(x_codes.device)
    if path == "triton" and out_dtype == torch.bfloat16:
        from ..turbo_kernels.rowwise_gemm import rowwise_matmul

        return rowwise_matmul(x_codes.contiguous(), x_scale.contiguous(), codes, scale, bias, gelu)
    if gelu and path != "scaled_mm":
        product = fp8_matmul_reference(x_codes, x_scale, codes, scale, torch.float32)
        return float32_epilogue(product, bias, gelu, out_dtype)
    use_scaled_mm = path == "scaled_mm"
    bias_in_gemm = use_scaled_mm and bias is not None and _scaled_mm_adds_bias(x_codes.device)
    out = fp8_linear_quantized(x_codes, x_scale, out_dtype, codes, scale, bias, use_scaled_mm, bias_in_gemm)
    return F.gelu(out, approximate="tanh") if gelu else out


def float32_epilogue(
    product: torch.Tensor, bias: torch.Tensor | None, gelu: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """product (+ bias) (then GELU_tanh if `gelu`) in float32, rounded to `out_dtype` once: the reference of
    the row-wise GEMM's epilogue (`rowwise_gemm`)."""
    if bias is not None:
        product = product + bias.float()
    if gelu:
        product = F.gelu(product, approximate="tanh")
    return product.to(out_dtype)


def fp8_gemm_fuses_gelu(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an fp8 W8A8 linear with inputs of `dtype` on `device` applies GELU in its GEMM's epilogue
    (the Triton path, bf16 output), so `gelu=True` saves the separate GELU kernel."""
    return _runs_triton_gemm(_fp8_path, device, dtype)


def _runs_triton_gemm(
    path_of: Callable[[torch.device], str], device: torch.device, dtype: torch.dtype
) -> bool:
    """Whether linears whose path on a device is `path_of(device)` run the Triton row-wise GEMM for inputs of
    `dtype` (it writes bf16 only)."""
    return device.type == "cuda" and dtype == torch.bfloat16 and path_of(device) == "triton"


def triton_quantises_fp8_activations(device: torch.device) -> bool:
    """Whether the fp8 linears on a CUDA device run a fast GEMM (Triton or `_scaled_mm`) with the Triton
    activation quantiser, i.e. Triton's e4m3 conversion runs there and agreed with PyTorch's quantiser:
    then a Triton kernel may emit the codes itself (the fused LayerNorm of `turbo_kernels.fused_norms`)."""
    if device.type != "cuda" or _fp8_path(device) not in FAST_FP8_PATHS:
        return False
    return _fp8_quantizer(device) is not quantize_rows_e4m3


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(device)
    return None


def _triton_version() -> tuple[int, int] | None:
    try:
        major, minor = version("triton").split(".")[:2]
        return int(major), int(minor)
    except (PackageNotFoundError, ValueError):
        return None


@functools.cache
def _int8_path(device: torch.device) -> str:
    plan = plan_int8(device, _triton_version(), _capability(device))
    return _logged(_checked(plan, device, _compare_int8), device)


@functools.cache
def _int8_rowwise_path(device: torch.device) -> str:
    plan = plan_int8_rowwise(device, _triton_version(), _capability(device))
    return _logged(_checked(plan, device, _compare_int8_rowwise), device)


@functools.cache
def _fp8_path(device: torch.device) -> str:
    capability = _capability(device)
    plan = plan_fp8(device, capability, _triton_version())
    if plan.path == "triton":
        plan = _checked(plan, device, _compare_rowwise_fp8, fallback=plan_fp8(device, capability))
    if plan.path == "scaled_mm":
        plan = _checked(plan, device, _compare_fp8)
    return _logged(plan, device)


@functools.cache
def _scaled_mm_adds_bias(device: torch.device) -> bool:
    """Whether this PyTorch's `_scaled_mm` takes a bias with row-wise scales on `device` and gives the
    separate add's result within the fast path's tolerance (checked once; older builds refuse the bias)."""
    x, weight, bias = _check_problem(device)
    codes, scale = quantize_rows_e4m3(weight)
    try:
        fused = fp8_linear(x, codes, scale, bias, use_scaled_mm=True, bias_in_gemm=True)
        error = _relative_error(fused, fp8_linear(x, codes, scale, bias, use_scaled_mm=True))
    except Exception as failure:  # a PyTorch build without the epilogue: keep the separate add
        logger.info("fp8 linears: bias added after _scaled_mm on %s (%r)", device, failure)
        return False
    if error > CHECK_RELATIVE_TOLERANCE:
        logger.warning(
            "fp8 linears: _scaled_mm's bias epilogue disagrees on %s (%.2e); not used", device, error
        )
        return False
    logger.info("fp8 linears: bias added in _scaled_mm's epilogue on %s", device)
    return True


@functools.cache
def _fp8_quantizer(device: torch.device) -> Callable:
    """The Triton activation quantiser where it equals PyTorch's on a check problem, else PyTorch's."""
    try:
        from ..turbo_kernels.fp8_quant import quantize_rows_e4m3_triton

        x = _check_problem(device)[0]
        codes, scale = quantize_rows_e4m3_triton(x)
        expected_codes, expected_scale = quantize_rows_e4m3(x)
        same = torch.equal(codes.float(), expected_codes.float()) and torch.equal(scale, expected_scale)
    except Exception as failure:  # compiler or Triton-version failures mean "do not use"
        logger.info("fp8 linears: Triton activation quantiser unavailable on %s (%r)", device, failure)
        return quantize_rows_e4m3
    if not same:
        logger.warning("fp8 linears: Triton activation quantiser disagrees on %s; using PyTorch's", device)
        return quantize_rows_e4m3
    logger.info("fp8 linears: Triton activation quantiser on %s", device)
    return quantize_rows_e4m3_triton


def _logged(plan: LinearPlan, device: torch.device) -> str:
    """`plan`'s path, its reason logged: a GPU running a reference path is worth a warning; the CPU always
    runs it."""
    slow_gpu = plan.path == "reference" and device.type == "cuda"
    logger.log(logging.WARNING if slow_gpu else logging.INFO, plan.reason)
    return plan.path


def _checked(
    plan: LinearPlan, device: torch.device, compare, fallback: LinearPlan | None = None
) -> LinearPlan:
    """`plan` if it is the reference or its self-check passes on `device`, else `fallback` (the reference by
    default)."""
    if plan.path == "reference":
        return plan
    try:
        error = compare(device)
    except Exception as failure:  # compiler, driver or PyTorch-version failures all mean "do not use"
        problem = f"failed on {device} ({failure!r})"
    else:
        if error <= CHECK_RELATIVE_TOLERANCE:
            return plan
        problem = f"disagree with the reference on {device} (error {error:.2e})"
    if fallback is None:
        return LinearPlan("reference", f"{plan.reason} {problem}; using the reference")
    logger.warning("%s %s; trying the next path", plan.reason, problem)
    return fallback


def _check_problem(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    rows, depth, columns = CHECK_SHAPE
    x = torch.randn(rows, depth, generator=generator).to(device, torch.bfloat16)
    weight = torch.randn(columns, depth, generator=generator).to(device)
    bias = torch.randn(columns, generator=generator).to(device, torch.bfloat16)
    return x, weight, bias


def _relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    return ((fast.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def _compare_int8(device: torch.device) -> float:
    from ..turbo_kernels.int8_gemm import w8a8_linear_triton

    x, weight, bias = _check_problem(device)
    codes, scale = quantize_tiles(weight)
    return _relative_error(w8a8_linear_triton(x, codes, scale, bias), w8a8_linear(x, codes, scale, bias))


def _compare_int8_rowwise(device: torch.device) -> float:
    """The Triton quantiser and GEMM against `int8_rowwise_reference`, without and with the GELU epilogue."""
    from ..turbo_kernels.rowwise_gemm import quantize_rows_int8, rowwise_linear

    x, weight, bias = _check_problem(device)
    codes, scale = quantize_rows_int8(weight)
    return max(
        _relative_error(
            rowwise_linear(x, codes, scale, bias, gelu), int8_rowwise_reference(x, codes, scale, bias, gelu)
        )
        for gelu in (False, True)
    )


def _compare_rowwise_fp8(device: torch.device) -> float:
    """The Triton row-wise GEMM against the float32 reference, without and with the GELU epilogue."""
    from ..turbo_kernels.rowwise_gemm import rowwise_matmul

    x, weight, bias = _check_problem(device)
    codes, scale = quantize_rows_e4m3(weight)
    x_codes, x_scale = _fp8_quantizer(device)(x)
    product = fp8_matmul_reference(x_codes, x_scale, codes, scale, torch.float32)
    return max(
        _relative_error(
            rowwise_matmul(x_codes, x_scale, codes, scale, bias, gelu),
            float32_epilogue(product, bias, gelu, torch.float32),
        )
        for gelu in (False, True)
    )


def _compare_fp8(device: torch.device) -> float:
    x, weight, bias = _check_problem(device)
    codes, scale = quantize_rows_e4m3(weight)
    fast = fp8_linear(x, codes, scale, bias, use_scaled_mm=True, quantize=_fp8_quantizer(device))
    return _relative_error(fast, fp8_linear(x, codes, scale, bias, use_scaled_mm=False))
