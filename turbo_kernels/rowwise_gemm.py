"""Row-wise scaled W8A8 GEMM in Triton, int8 and fp8 (issue 6; KERNELS.md §4.6 "fast path").

Computes, for A [M, K] and B [N, K] both int8 or both float8_e4m3fn (row-major, K-contiguous):

    Y[m, n] = (Σ_k A[m, k] · B[n, k]) · sa[m] · sb[n]  (+ bias[n])  (then GELU-tanh, on request)  -> bf16

* int8: the dot accumulates in int32 over the whole K (exact: |Σ| <= 127²·K < 2³¹ for K < 133144), converted
  to float32 once; fp8: e4m3 products accumulated in float32 (on Hopper without the periodic promotion,
  Triton's default `max_num_imprecise_acc`, as cuBLAS' fast accumulation). The epilogue runs once per output
  tile in float32: × sa[m] × sb[n], + bias, optional GELU-tanh (`F.gelu(approximate="tanh")` written as
  y / (1 + exp(-2z)), z = √(2/π)(y + 0.044715 y³)), one rounding to bf16.
* `quantize_rows_int8_triton` / `quantize_rows_int8`: per-token int8 activation codes for it. scale_r =
  amax_r / 127, code = round-half-even(x · (127 / amax_r)) saturated to ±127, amax floored at 1e-8, 127/amax
  and amax/127 correctly rounded (the kernel is shared with the e4m3 quantiser: `row_quant.py`).
* `requantize_tiles_to_rows`: a `-quant` checkpoint weight (int8, one scale per 128×128 tile) to per-output-
  channel int8: w = code · s_tile in float32, then the row quantiser above (s_n = max_k|w| / 127), with its
  rel-L2 distance to the tile weight, over the matrix and for the worst tile, so that a caller can refuse a
  layer that loses too much.
* `tile_scaled_matmul`: the exact `-quant` product (TURBODIFFUSION.md §11, KERNELS.md §1.7) on the same
  persistent kernel (a constexpr variant of one `@triton.jit` body): int8 A and W with one float32 scale per
  128×128 tile (A's from `int8_gemm.quantize_tiles_triton`), BLOCK_K = 128; every K step converts the block's
  int32 sum to float32 and adds it times sa·sw to a float32 accumulator; the epilogue casts to the output
  dtype and adds the bias in it, as `w8a8_reference`. A bench variant: no model path uses it yet.
* `rowwise_linear`: x [..., K] -> quantise per token (int8 or e4m3, like the weight) -> GEMM -> [..., N] bf16.

Kernel: persistent (programs_per_sm programs per SM, tiles in grouped order so GROUP_M row tiles share the B
tiles they read from L2), A and B loaded and the output stored through TMA tensor descriptors where the GPU
and the layout allow it (sm90+, 16-byte aligned rows: K % 16 == 0, N % 8 == 0), else pointer loads (Ampere /
Ada, odd shapes). The descriptors are host-side (`triton.tools.tensor_descriptor`, Triton >= 3.3): the in-
kernel `tl.make_tensor_descriptor` (Triton >= 3.4; `tl._experimental_make_tensor_descriptor` in 3.3) needs a
global scratch allocator set with `triton.set_allocator`, process-wide state a node pack should not set
behind ComfyUI's back. The tile loop and the K loop form one flattened software pipeline
(`tl.range(..., flatten=True)`, Triton >= 3.4), so the loads of the next tile overlap this tile's epilogue;
the output tile is stored as two halves (half the shared memory of one store). On Hopper Triton keeps only
float32-accumulating `wgmma` in flight (its WGMMA pipeliner, 2026): the fp8 dot is asynchronous, the int8 dot
waits for completion every K step, which two programs per SM hide. No autotuning at run time:
`default_config` picks a `RowwiseGemmConfig` from a per-architecture table (bench/memory.py has the sweep
the Hopper entries should come from).

Contract: a, b contiguous, same dtype (int8 or float8_e4m3fn); a_scale [M] and b_scale [N] float32; bias [N]
(any float dtype, read as float32) or None; any M, N, K >= 1 (tails zero-filled by TMA or masked). Output
[M, N] bf16. GPUs: int8 on compute capability >= 8.0 (IMMA; IGMMA `wgmma …s32.s8.s8` on sm90), fp8 on >= 8.9
(QMMA / QGMMA `…f32.e4m3.e4m3`) and on sm120 only with Triton >= 3.6 (3.4 runs it on fp16 tensor cores,
KERNELS.md §4.8): see `rowwise_gemm_supported`.

Tested (no GPU in CI): tests/rowwise_gemm_interpret_cases.py runs the kernels under TRITON_INTERPRET=1
(descriptor and pointer paths, ragged M/N/K, bias, GELU) against formulas written in the test: int8 exact
in int64, then scaled in float64 (within one bf16 ulp); fp8 against float64; the quantiser bit-exact.
tests/tile_gemm_interpret_cases.py checks `tile_scaled_matmul` against `w8a8_reference.w8a8_matmul` /
`w8a8_linear` (within one output ulp; bit for bit on the interpreter, which does not fuse the multiply-add).
tests/rowwise_gemm_compile_check.py compiles the default configs for sm80/89/90 (no spills; int8 → wgmma
s32.s8.s8, fp8 → wgmma e4m3 on sm90); run by hand with Triton 3.6.0 (the GPU's) and 3.9.0 (CI's) on
2026-11-21: both compile, 3.6 needs the explicit int32 `out_dtype` of the int8 dot. Speed on a GPU: not
measured when this was written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .descriptors import TensorDescriptor
from .fp8_linear import E4M3
from .fp8_quant import quantize_rows_e4m3_triton
from .int8_gemm import _cast, int32_to_float_exact
from .interpreter import interpreting
from .row_quant import quantize_rows
from .row_quant_reference import AMAX_FLOOR, quantize_rows_reference
from .w8a8_reference import TILE, dequantize_tiles, tile_grid

INT8_LEVELS = 127.0
MIN_TRITON = (3, 4)  # tl.range(flatten=...)
# F.gelu(approximate="tanh"): 0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³))).
_GELU_SCALE = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)
_TILE = tl.constexpr(TILE)
# TMA: base addresses and row strides must be multiples of 16 bytes.
DESCRIPTOR_ALIGNMENT = 16
CODE_DTYPES = (torch.int8, E4M3)
# Programs of the persistent grid on the CPU interpreter (several tiles each, like a GPU's SMs).
INTERPRETER_PROGRAMS = 3


@dataclass(frozen=True)
class RowwiseGemmConfig:
    """Tile shape and launch of `rowwise_matmul`. `descriptors` asks for TMA loads and stores (used only
    where `descriptors_usable` allows them); `flatten` pipelines the tile and K loops as one;
    `split_epilogue` stores each output tile as two halves of BLOCK_N / 2 columns; `programs_per_sm` > 1
    launches that many persistent programs per SM, which run side by side where registers and shared memory
    allow (on Hopper the int8 `wgmma` is never asynchronous in Triton, so a second program is what fills the
    tensor cores while one waits; Triton's WGMMA pipeliner only keeps float32 accumulators in flight)."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    descriptors: bool = True
    flatten: bool = True
    split_epilogue: bool = True
    programs_per_sm: int = 1
    bit_convert: bool = False

    def label(self) -> str:
        names = ("descriptors", "flatten", "split_epilogue", "bit_convert")
        flags = [name for name in names if getattr(self, name)]
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages} "
            f"g{self.group_m} x{self.programs_per_sm} {'+'.join(flags) or 'pointers'}"
        )


# Per architecture family and operand type; not yet tuned on a GPU (2026-11-21): bench/memory.py's sweep
# should replace the Hopper entries. Hopper fp8: the shape of Triton's persistent fp8 matmul tutorial
# (128×256×128, 8 warps, 3 stages: 144 KB of operand buffers + 32 KB for a half-tile store). Hopper int8: its
# wgmma waits for completion every K step (see `RowwiseGemmConfig`), so two 4-warp programs of 128×128×128
# share each SM (112 KB of shared memory and 128 threads × 255 registers each: both fit). Ampere (164 KB of
# shared memory) and the consumer GPUs (sm86/89/120, ~100 KB): 128×128×64, 8 warps, 4 stages (48 KB), pointer
# loads. Every entry compiles without spills (tests/test_rowwise_gemm_compile.py).
_HOPPER_FP8 = RowwiseGemmConfig()
_HOPPER_INT8 = RowwiseGemmConfig(block_n=128, num_warps=4, num_stages=3, programs_per_sm=2)
_POINTER = RowwiseGemmConfig(
    block_n=128, block_k=64, num_stages=4, descriptors=False, flatten=False, split_epilogue=False
)
DEFAULT_CONFIGS: dict[str, dict[torch.dtype, RowwiseGemmConfig]] = {
    "hopper": {torch.int8: _HOPPER_INT8, E4M3: _HOPPER_FP8},
    "ampere": {torch.int8: _POINTER, E4M3: _POINTER},
    "consumer": {torch.int8: _POINTER, E4M3: _POINTER},
}


# `tile_scaled_matmul`; not yet tuned on a GPU (bench/memory.py's sweep has the candidates). Hopper: the
# row-wise int8 launch (two 4-warp 128×128×128 programs per SM); there each thread holds an int32 partial
# tile and the float32 accumulator (2 × 128 registers), and ptxas (Triton 3.9, sm90) spills 152-160 bytes;
# 8 warps (167-179 registers) and 64×128 tiles with 4 warps do not spill (tests/test_tile_gemm_compile.py).
# Elsewhere: 8 warps, 3 stages (64 KB of operand buffers, within the consumer GPUs' ~100 KB), pointer loads.
TILE_SCALED_CONFIGS: dict[str, RowwiseGemmConfig] = {
    "hopper": _HOPPER_INT8,
    "ampere": replace(_POINTER, block_k=TILE, num_stages=3),
    "consumer": replace(_POINTER, block_k=TILE, num_stages=3),
}
TILE_SCALED_OUT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def architecture_family(capability: tuple[int, int] | None) -> str:
    """'hopper' (sm90, sm100: TMA and large shared memory), 'ampere' (sm80) or 'consumer' (sm86/89/120);
    None (the CPU interpreter) counts as Hopper."""
    if capability is None or capability[0] in (9, 10):
        return "hopper"
    return "ampere" if capability == (8, 0) else "consumer"


def default_config(device: torch.device, code_dtype: torch.dtype) -> RowwiseGemmConfig:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return DEFAULT_CONFIGS[architecture_family(capability)][code_dtype]


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def rowwise_gemm_supported(device: torch.device, code_dtype: torch.dtype) -> bool:
    """Whether `rowwise_matmul` runs on `device` with operands of `code_dtype` at tensor-core speed."""
    if device.type != "cuda":
        return _triton_version() >= MIN_TRITON and interpreting() and code_dtype in CODE_DTYPES
    return rowwise_gemm_capable(torch.cuda.get_device_capability(device), _triton_version(), code_dtype)


def rowwise_gemm_capable(
    capability: tuple[int, int], triton_version: tuple[int, int], code_dtype: torch.dtype
) -> bool:
    """`rowwise_gemm_supported` for a CUDA GPU of `capability` and a Triton version (pure)."""
    if triton_version < MIN_TRITON:
        return False
    if code_dtype == torch.int8:
        return capability >= (8, 0)
    if code_dtype == E4M3:
        return capability >= (8, 9) and (capability[0] < 12 or triton_version >= (3, 6))
    return False


def descriptors_usable(*tensors: torch.Tensor) -> bool:
    """TMA tensor descriptors: Triton has them, the GPU has TMA (sm90+; the interpreter emulates them) and
    every 2-D tensor has 16-byte aligned base address and row stride."""
    if TensorDescriptor is None:
        return False
    device = tensors[0].device
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return all(
        t.data_ptr() % DESCRIPTOR_ALIGNMENT == 0
        and t.stride(0) * t.element_size() % DESCRIPTOR_ALIGNMENT == 0
        for t in tensors
    )


@triton.jit
def _tile_origin(tile, tiles_m, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """First row and column of output tile number `tile` in grouped order: GROUP_M row tiles walk the
    column tiles together, so the B tiles they read stay in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_rows
    pid_n = (tile % per_group) // group_rows
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _epilogue(
    acc,
    out,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    row0,
    col0,
    M,
    N,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    TILE_SCALES: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    DESCRIPTORS: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = row0 + tl.arange(0, BLOCK_M)
    columns = col0 + tl.arange(0, BLOCK_N)
    if TILE_SCALES:
        # Already scaled in the K loop. As `w8a8_reference.w8a8_linear`: cast, then `+ bias` in the output
        # dtype (bias rounded to it, the sum in float32, rounded again).
        y = _cast(acc, OUT_DTYPE, SOFTWARE_BF16)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + columns, mask=columns < N, other=0.0).to(OUT_DTYPE).to(tl.float32)
            y = _cast(y.to(tl.float32) + bias[None, :], OUT_DTYPE, SOFTWARE_BF16)
    else:
        a_scale = tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)
        b_scale = tl.load(b_scale_ptr + columns, mask=columns < N, other=0.0)
        y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + columns, mask=columns < N, other=0.0).to(tl.float32)[None, :]
        if GELU:
            # 0.5·y·(1 + tanh z) = y · sigmoid(2z): no tanh needed, and exact limits (y, −0) for large |y|.
            z = _GELU_SCALE * (y + _GELU_CUBIC * y * y * y)
            y = y / (1.0 + tl.exp(-2.0 * z))
        y = _cast(y, OUT_DTYPE, SOFTWARE_BF16)
    if DESCRIPTORS:
        if SPLIT_EPILOGUE:
            left, right = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            out.store([row0, col0], left)
            out.store([row0, col0 + BLOCK_N // 2], right)
        else:
            out.store([row0, col0], y)
    else:
        offsets = rows.to(tl.int64)[:, None] * N + columns[None, :]
        tl.store(out + offsets, y, mask=(rows[:, None] < M) & (columns[None, :] < N))


@triton.jit
def _persistent_gemm(
    a,
    b,
    out,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    INTEGER: tl.constexpr,
    TILE_SCALES: tl.constexpr,
    BIT_CONVERT: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    DESCRIPTORS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    # a, b, out: tensor descriptors (blocks [BLOCK_M, BLOCK_K], [BLOCK_N, BLOCK_K], [BLOCK_M, BLOCK_N or
    # BLOCK_N / 2]) when DESCRIPTORS, else pointers to contiguous matrices. TILE_SCALES: int8 operands with
    # one scale per 128×128 tile (a_scale [⌈M/128⌉, ⌈K/128⌉], b_scale [⌈N/128⌉, ⌈K/128⌉]), dequantised every
    # K step into a float32 accumulator; else int32 / float32 accumulation and per-row scales in the epilogue.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=FLATTEN):
        row0, col0 = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
        if not DESCRIPTORS:
            # Rows and columns past the end read valid (wrapped) memory; the epilogue never stores them.
            a_rows = a + ((row0 + tl.arange(0, BLOCK_M)) % M).to(tl.int64)[:, None] * K
            b_rows = b + ((col0 + tl.arange(0, BLOCK_N)) % N).to(tl.int64)[:, None] * K
        if TILE_SCALES:
            # BLOCK_K is the 128-wide scale tile and BLOCK_M, BLOCK_N divide 128: one scale of each operand
            # covers the whole output tile at each K step.
            a_scale_row = a_scale_ptr + (row0 // _TILE).to(tl.int64) * k_steps
            b_scale_row = b_scale_ptr + (col0 // _TILE).to(tl.int64) * k_steps
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INTEGER and not TILE_SCALES else tl.float32)
        for step in range(k_steps):
            k0 = step * BLOCK_K
            if DESCRIPTORS:
                a_tile = a.load([row0, k0])
                b_tile = b.load([col0, k0])
            elif EVEN_K:
                a_tile = tl.load(a_rows + (k0 + offs_k)[None, :])
                b_tile = tl.load(b_rows + (k0 + offs_k)[None, :])
            else:
                in_k = (k0 + offs_k)[None, :] < K
                a_tile = tl.load(a_rows + (k0 + offs_k)[None, :], mask=in_k, other=0.0)
                b_tile = tl.load(b_rows + (k0 + offs_k)[None, :], mask=in_k, other=0.0)
            if TILE_SCALES:
                partial = tl.dot(a_tile, b_tile.T, out_dtype=tl.int32)  # exact: |Σ| <= 2^21
                scale = tl.load(a_scale_row + step) * tl.load(b_scale_row + step)
                acc += (int32_to_float_exact(partial) if BIT_CONVERT else partial.to(tl.float32)) * scale
            else:
                # Triton 3.6 needs the explicit out_dtype for int32.
                acc = tl.dot(a_tile, b_tile.T, acc, out_dtype=acc.dtype)
        _epilogue(
            acc,
            out,
            a_scale_ptr,
            b_scale_ptr,
            bias_ptr,
            row0,
            col0,
            M,
            N,
            HAS_BIAS,
            GELU,
            TILE_SCALES,
            OUT_DTYPE,
            DESCRIPTORS,
            SPLIT_EPILOGUE,
            SOFTWARE_BF16,
            BLOCK_M,
            BLOCK_N,
        )


@triton.jit
def _rowwise_gemm_kernel(
    a,
    b,
    out,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    INTEGER: tl.constexpr,
    DESCRIPTORS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    _persistent_gemm(
        a,
        b,
        out,
        a_scale_ptr,
        b_scale_ptr,
        bias_ptr,
        M,
        N,
        K,
        HAS_BIAS,
        GELU,
        INTEGER,
        False,
        False,
        tl.bfloat16,
        DESCRIPTORS,
        EVEN_K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        GROUP_M,
        FLATTEN,
        SPLIT_EPILOGUE,
        SOFTWARE_BF16,
    )


@triton.jit
def _tile_scaled_gemm_kernel(
    a,
    b,
    out,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BIT_CONVERT: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    DESCRIPTORS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    tl.static_assert(_TILE % BLOCK_M == 0 and _TILE % BLOCK_N == 0 and BLOCK_K == _TILE)
    _persistent_gemm(
        a,
        b,
        out,
        a_scale_ptr,
        b_scale_ptr,
        bias_ptr,
        M,
        N,
        K,
        HAS_BIAS,
        False,
        True,
        True,
        BIT_CONVERT,
        OUT_DTYPE,
        DESCRIPTORS,
        EVEN_K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        GROUP_M,
        FLATTEN,
        SPLIT_EPILOGUE,
        SOFTWARE_BF16,
    )


def quantize_rows_int8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x (unit column stride) -> (int8 codes with x's shape, float32 scale per row), bit for bit
    `quantize_rows_int8`."""
    return quantize_rows(x, torch.int8, INT8_LEVELS)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the per-row int8 quantiser: (codes, scale_r = amax_r / 127)."""
    return quantize_rows_reference(x, torch.int8, INT8_LEVELS)


@dataclass(frozen=True)
class RowwiseInt8Weight:
    """A linear weight in the row-wise int8 format, `codes` int8 [N, K] and `scale` float32 [N], with its
    distance to the 128×128-tile weight W it came from: `relative_error` = ‖codes·scale − W‖ / ‖W‖ over the
    matrix, `worst_tile_error` the same ratio for the worst 128×128 tile. A row whose scale is set by one
    large tile rounds its small tiles to almost nothing; the large tile dominates the norms of the matrix and
    of the row, so only the per-tile ratio shows it."""

    codes: torch.Tensor
    scale: torch.Tensor
    relative_error: float
    worst_tile_error: float


def requantize_tiles_to_rows(codes: torch.Tensor, tile_scale: torch.Tensor) -> RowwiseInt8Weight:
    """A `-quant` weight (int8 [N, K], float32 scales [⌈N/128⌉, ⌈K/128⌉]) -> per-output-channel int8. Runs
    on the tensors' device (PyTorch only, same bits on every device); ~10 bytes of temporaries per weight."""
    weight = dequantize_tiles(codes, tile_scale, torch.float32)
    row_codes, row_scale = quantize_rows_int8(weight)
    difference = (row_codes.float() * row_scale[:, None]).sub_(weight)
    error = (difference.norm() / weight.norm().clamp_min(AMAX_FLOOR)).item()
    tile_errors = _tile_norms(difference) / _tile_norms(weight).clamp_min(AMAX_FLOOR)
    return RowwiseInt8Weight(row_codes, row_scale, error, tile_errors.max().item())


def _tile_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every 128×128 tile of a 2-D x (zero-padded at the edges), shape `tile_grid(*x.shape)`."""
    tile_rows, tile_columns = tile_grid(*x.shape)
    padded = F.pad(x, (0, tile_columns * TILE - x.shape[1], 0, tile_rows * TILE - x.shape[0]))
    return padded.view(tile_rows, TILE, tile_columns, TILE).square().sum(dim=(1, 3)).sqrt()


def rowwise_matmul_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """PyTorch reference of `rowwise_matmul` in float64 (int8 sums exact; e4m3 products exact, the sum
    rounded less than the kernel's float32), rounded to bf16 once."""
    y = (a.double() @ b.double().T) * a_scale.double()[:, None] * b_scale.double()[None, :]
    if bias is not None:
        y += bias.double()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y.to(torch.bfloat16)


def _check_operands(a, a_scale, b, b_scale, bias) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected A [M, K] and B [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in CODE_DTYPES:
        raise ValueError(f"A and B must both be int8 or both float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("A and B must be contiguous (row-major, K-contiguous): call .contiguous() first")
    for name, scale, length in (("a_scale", a_scale, a.shape[0]), ("b_scale", b_scale, b.shape[0])):
        if scale.shape != (length,) or scale.dtype != torch.float32 or not scale.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous float32 vector of {length}, got {scale.dtype} "
                f"{tuple(scale.shape)}"
            )
    if bias is not None and (bias.shape != (b.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous vector of {b.shape[0]}, got {tuple(bias.shape)}")


def _programs(device: torch.device, tiles: int, per_sm: int) -> int:
    if device.type != "cuda":
        return min(tiles, INTERPRETER_PROGRAMS)
    return min(tiles, per_sm * torch.cuda.get_device_properties(device).multi_processor_count)


def _launch_persistent(kernel, a, b, out, a_scale, b_scale, bias, config: RowwiseGemmConfig, **flags):
    """Launch a persistent GEMM kernel (`_rowwise_gemm_kernel` or `_tile_scaled_gemm_kernel`) over A [M, K],
    B [N, K] into `out` [M, N]: TMA descriptors where usable, grouped tile order, `flags` the kernel's own
    constexprs."""
    rows, depth = a.shape
    columns = b.shape[0]
    use_descriptors = config.descriptors and descriptors_usable(a, b, out)
    if use_descriptors:
        store_n = config.block_n // 2 if config.split_epilogue else config.block_n
        operands = (
            TensorDescriptor.from_tensor(a, [config.block_m, config.block_k]),
            TensorDescriptor.from_tensor(b, [config.block_n, config.block_k]),
            TensorDescriptor.from_tensor(out, [config.block_m, store_n]),
        )
    else:
        operands = (a, b, out)
    tiles = triton.cdiv(rows, config.block_m) * triton.cdiv(columns, config.block_n)
    kernel[(_programs(a.device, tiles, config.programs_per_sm),)](
        *operands,
        a_scale,
        b_scale,
        bias if bias is not None else a_scale,
        rows,
        columns,
        depth,
        HAS_BIAS=bias is not None,
        DESCRIPTORS=use_descriptors,
        EVEN_K=depth % config.block_k == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        FLATTEN=config.flatten,
        SPLIT_EPILOGUE=config.split_epilogue,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **flags,
    )
    return out


def rowwise_matmul(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    config: RowwiseGemmConfig | None = None,
) -> torch.Tensor:
    """(A [M, K] · B [N, K]ᵀ) · a_scale[m] · b_scale[n] (+ bias[n]) (GELU-tanh if `gelu`) -> [M, N] bf16."""
    _check_operands(a, a_scale, b, b_scale, bias)
    rows, depth = a.shape
    columns = b.shape[0]
    config = config or default_config(a.device, a.dtype)
    out = torch.empty(rows, columns, dtype=torch.bfloat16, device=a.device)
    if rows == 0 or columns == 0:
        return out
    if depth == 0:
        return out.copy_(rowwise_matmul_reference(a, a_scale, b, b_scale, bias, gelu))
    return _launch_persistent(
        _rowwise_gemm_kernel,
        a,
        b,
        out,
        a_scale,
        b_scale,
        bias,
        config,
        GELU=gelu,
        INTEGER=a.dtype == torch.int8,
        SOFTWARE_BF16=interpreting(),
    )


def _check_tile_operands(a8, a_scale, w8, w_scale, bias, out_dtype) -> None:
    if a8.dim() != 2 or w8.dim() != 2 or a8.shape[1] != w8.shape[1]:
        raise ValueError(f"expected A [M, K] and W [N, K], got {tuple(a8.shape)} and {tuple(w8.shape)}")
    if a8.dtype != torch.int8 or w8.dtype != torch.int8:
        raise ValueError(f"A and W must both be int8 codes, got {a8.dtype} and {w8.dtype}")
    if out_dtype not in TILE_SCALED_OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(TILE_SCALED_OUT_DTYPES)}, got {out_dtype}")
    for name, codes, scale in (("a_scale", a8, a_scale), ("w_scale", w8, w_scale)):
        grid = tile_grid(*codes.shape)
        if scale.shape != grid or scale.dtype != torch.float32 or not scale.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous float32 {grid} (one scale per 128×128 tile), got {scale.dtype} "
                f"{tuple(scale.shape)}"
            )
    if not (a8.is_contiguous() and w8.is_contiguous()):
        raise ValueError("A and W must be contiguous (row-major, K-contiguous): call .contiguous() first")
    if bias is not None and (bias.shape != (w8.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous vector of {w8.shape[0]}, got {tuple(bias.shape)}")


def tile_scaled_matmul(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: RowwiseGemmConfig | None = None,
) -> torch.Tensor:
    """The exact `-quant` product on the persistent kernel: A [M, K] and W [N, K] int8 with one float32 scale
    per 128×128 tile (a_scale [⌈M/128⌉, ⌈K/128⌉] from `int8_gemm.quantize_tiles_triton`, w_scale
    [⌈N/128⌉, ⌈K/128⌉], the checkpoint's `scale`) -> [M, N] in `out_dtype` (bf16, fp16 or fp32):
    acc += fp32(int32 Σ of one 128-wide K block) · (sa · sw) per K block, cast, then `+ bias` in `out_dtype`,
    as `w8a8_reference.w8a8_matmul` and `w8a8_linear` (the GPU may fuse the multiply-add: one float32
    rounding less per K block). `config`: block_k 128, block_m and block_n dividing 128 (default:
    `TILE_SCALED_CONFIGS`)."""
    _check_tile_operands(a8, a_scale, w8, w_scale, bias, out_dtype)
    if config is None:
        capability = torch.cuda.get_device_capability(a8.device) if a8.device.type == "cuda" else None
        config = TILE_SCALED_CONFIGS[architecture_family(capability)]
    if TILE % config.block_m or TILE % config.block_n or config.block_k != TILE:
        raise ValueError(
            f"the tile-scale format needs block_k 128 and block_m, block_n dividing 128, got {config.label()}"
        )
    rows, depth = a8.shape
    columns = w8.shape[0]
    out = torch.empty(rows, columns, dtype=out_dtype, device=a8.device)
    if rows == 0 or columns == 0 or depth == 0:
        return out.zero_() if bias is None else out.copy_(bias.to(out_dtype).expand(rows, columns))
    return _launch_persistent(
        _tile_scaled_gemm_kernel,
        a8,
        w8,
        out,
        a_scale,
        w_scale,
        bias,
        config,
        BIT_CONVERT=config.bit_convert,
        OUT_DTYPE=TILE_SCALED_OUT_DTYPES[out_dtype],
        SOFTWARE_BF16=interpreting() and out_dtype == torch.bfloat16,
    )


def rowwise_linear(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    config: RowwiseGemmConfig | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N] bf16: quantise x per token to the weight's type (int8: `quantize_rows_int8_
    triton`; e4m3: `fp8_quant.quantize_rows_e4m3_triton`), then `rowwise_matmul` with the weight's
    per-output-channel codes [N, K] and scales [N]."""
    depth = x.shape[-1]
    x2 = x.reshape(-1, depth)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    quantize = quantize_rows_int8_triton if weight_codes.dtype == torch.int8 else quantize_rows_e4m3_triton
    codes, scale = quantize(x2)
    out = rowwise_matmul(codes, scale, weight_codes, weight_scale, bias, gelu, config)
    return out.reshape(*x.shape[:-1], weight_codes.shape[0])
