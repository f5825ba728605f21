"""Memory and speed of the quantised and block-swapped Wan DiT (issue 6, item 4). One call, three tables:

1. GEMM throughput at the Wan shapes (M = 32760 and 75600 tokens; K, N of the 1.3B and 14B block linears):
   bf16 `torch.matmul` against the int8 W8A8 Triton path for the `-quant` 128×128-tile format (with and
   without its activation quantiser: "int8", "int8 gemm"), the same exact format on the persistent kernel of
   turbo_kernels/rowwise_gemm.py (the Triton tile quantiser + `tile_scaled_matmul`: "int8 tiles persistent"),
   the row-wise int8 path of
   turbo_kernels/rowwise_gemm.py (per-token Triton quantiser + GEMM: "int8 rw"; GEMM alone: "int8 rw gemm";
   its weight re-quantised from the tile format, error printed), the fp8 path (per-token quantisation, by
   Triton on FP8 GPUs, + `torch._scaled_mm`: "fp8"; `_scaled_mm` alone: "fp8 mm") and the row-wise Triton
   GEMM on the same fp8 inputs (the Triton e4m3 quantiser + the GEMM, the path the model's fp8 linears take
   where it runs: "fp8 tri"; the GEMM alone: "fp8 tri gemm"), side by side, with rel-L2 errors against the
   bf16 product as a sanity check. Then a few tile configs of the tile-format int8 GEMM at M = 75600,
   K = N = 5120, and a sweep of persistent GEMM configs (row-wise int8 and fp8, and the tile-format int8
   variant: "int8 tiles") at M 75600, K = N 5120 and M 32760, K 1536, N 8960.
2. Load-time int8 quantisation of a 14B bf16 state dict held on the CPU, one layer at a time on the GPU:
   peak GPU memory next to the size of the int8 model.
3. One DiT step (one forward; rCM runs one per step) of random-weight models at full size: the A14B I2V expert
   at 720p / 81 frames in bf16, int8, fp8, and int8 and bf16 with block swap under a 24 GB cap
   (`torch.cuda.set_per_process_memory_fraction`), the 1.3B at 480p under an 8 GB cap. Peak = the caching
   allocator's `max_memory_allocated` (weights + activations; the CUDA context is not included); the
   activation estimate used by `plan_block_swap` is printed beside it.

Usage, from the repository root:
    python bench/memory.py                 # a CUDA GPU with >= 64 GB (H100 / H200), about 8-11 minutes
    python bench/memory.py --skip load,steps   # the GEMM tables and sweeps only, about 3 minutes
    python bench/memory.py --dry-run       # tiny shapes on the CPU: checks that every path runs
Options: --attention sagesla|sla|sdpa (default sagesla), --steps N timed forwards per scenario (2),
--skip gemm,sweep,load,steps (sweep: the config sweeps after the GEMM table). Prints the tables and appends
nothing anywhere: copy them into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from _checkout import alias_checkout_as_package
from _environment import environment_line

alias_checkout_as_package()

from comfyui_turbodiffusion.turbo_kernels import fp8_linear as fp8  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import int8_gemm  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import rowwise_gemm as rowwise  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import w8a8_reference as int8_reference  # noqa: E402
from comfyui_turbodiffusion.wan_models.attention import make_self_attention, sdpa_attention  # noqa: E402
from comfyui_turbodiffusion.wan_models.block_ops import make_block_ops  # noqa: E402
from comfyui_turbodiffusion.wan_models.block_swap import (  # noqa: E402
    GIB,
    enable_block_swap,
    estimate_activation_bytes,
    plan_block_swap,
    tensor_bytes,
)
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig  # noqa: E402
from comfyui_turbodiffusion.wan_models.dit import WanDiT  # noqa: E402
from comfyui_turbodiffusion.wan_models.linear_kernels import quantize_fp8_activations  # noqa: E402
from comfyui_turbodiffusion.wan_models.quantize import (  # noqa: E402
    convert_linear_weights_,
    quantize_model_linears_,
    quantized_linear_names,
)
from comfyui_turbodiffusion.wan_models.resolution import latent_shape  # noqa: E402

GEMM_TOKENS = (32760, 75600)
# (label, K, N) of the block linears: q/k/v/o and cross-attention (dim -> dim), FFN up, FFN down.
GEMM_LAYERS = (
    ("1.3B qkvo", 1536, 1536),
    ("1.3B ffn.0", 1536, 8960),
    ("1.3B ffn.2", 8960, 1536),
    ("14B qkvo", 5120, 5120),
    ("14B ffn.0", 5120, 13824),
    ("14B ffn.2", 13824, 5120),
)
# int8_gemm.GemmConfig launches; tiles must divide 128. The first is the default config; bit_convert: the
# K blocks' int32 sums converted by bit manipulation instead of the quarter-rate I2F instruction.
_G = int8_gemm.GemmConfig
INT8_SWEEP = (
    _G(),
    _G(bit_convert=True),
    _G(num_stages=4),
    _G(num_stages=4, bit_convert=True),
    _G(block_n=64, num_warps=4, num_stages=4),
    _G(block_m=64, num_warps=4, num_stages=4),
    _G(block_m=64, num_warps=4, num_stages=4, bit_convert=True),
    _G(block_m=64, block_n=64, num_warps=4, num_stages=4),
)
TARGET_SPEEDUP = 1.6
# Shapes (M, K, N) and configs of the row-wise GEMM sweep (turbo_kernels/rowwise_gemm.py). All Hopper-style
# (TMA descriptors, persistent); "x2" rows run two programs per SM, which only fit with 4 warps.
ROWWISE_SWEEP_SHAPES = ((75600, 5120, 5120), (32760, 1536, 8960))
_RW = rowwise.RowwiseGemmConfig
ROWWISE_SWEEP = (
    _RW(),
    _RW(flatten=False),
    _RW(split_epilogue=False),
    _RW(num_stages=4),
    _RW(block_k=64, num_stages=4),
    _RW(block_k=64, num_stages=5),
    _RW(block_m=256, block_n=128),
    _RW(block_m=256, block_n=128, block_k=64, num_stages=4),
    _RW(block_n=128, num_stages=4),
    _RW(block_n=128, block_k=64, num_stages=5),
    _RW(block_n=128, num_warps=4, num_stages=3),
    _RW(block_n=128, num_warps=4, num_stages=3, programs_per_sm=2),
    _RW(block_n=128, block_k=64, num_warps=4, num_stages=4, programs_per_sm=2),
    _RW(block_n=128, block_k=64, num_warps=4, num_stages=5, programs_per_sm=2),
)
# `tile_scaled_matmul` (the -quant format on the persistent kernel): K steps of 128 = the scale tile. Two
# 4-warp programs per SM (the 128-row one spills a little, the 64-row one does not) against one 8-warp
# program.
_TILE_LAUNCHES = (
    _RW(block_n=128, num_warps=4, num_stages=3, programs_per_sm=2),
    _RW(block_m=64, block_n=128, num_warps=4, num_stages=3, programs_per_sm=2),
    _RW(block_m=64, block_n=128, num_warps=4, num_stages=4, programs_per_sm=2),
    _RW(block_n=128, num_warps=8, num_stages=3),
    _RW(block_n=128, num_warps=8, num_stages=4),
)
TILE_SWEEP = _TILE_LAUNCHES + tuple(replace(config, bit_convert=True) for config in _TILE_LAUNCHES)


@dataclass(frozen=True)
class Scenario:
    label: str
    config: WanDiTConfig
    size: tuple[int, int]  # width, height
    frames: int
    storage: str  # dense, int8, fp8
    cap_gb: float | None = None  # per-process memory cap; the swap count is planned from it


def say(text: str = "") -> None:
    print(text, flush=True)


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        say("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)))
    say()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


class Clock:
    """Median milliseconds of a callable: triton's do_bench on CUDA (L2 flushed), perf_counter elsewhere."""

    def __init__(self, device: torch.device, warmup: int = 25, rep: int = 100) -> None:
        self.device = device
        self.warmup, self.rep = warmup, rep

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]


def gemm_table(
    device: torch.device, tokens: tuple[int, ...], layers: tuple, clock: Clock, sweep: bool
) -> None:
    say("GEMM throughput (TFLOPS = 2·M·N·K / time; speed-up against bf16 torch.matmul; err = rel-L2 vs bf16)")
    cuda = device.type == "cuda"
    int8_linear, int8_matmul, quantize_x = _int8_paths(cuda)
    tile_persistent = _tile_persistent_linear(device)
    use_scaled_mm = cuda and torch.cuda.get_device_capability(device) >= fp8.SCALED_MM_MIN_CAPABILITY
    fp8_quantize = quantize_fp8_activations  # the quantiser the model's fp8 linears use on this device
    rowwise_linear, rowwise_matmul, quantize_rows_int8 = _rowwise_paths(device)
    fp8_rowwise = rowwise_matmul if _rowwise_runs(device, fp8.E4M3) else rowwise.rowwise_matmul_reference
    rows = []
    for m in tokens:
        for label, k, n in layers:
            generator = torch.Generator(device).manual_seed(m + k + n)
            x = torch.randn(m, k, generator=generator, device=device).to(torch.bfloat16)
            w = (torch.randn(n, k, generator=generator, device=device) / math.sqrt(k)).to(torch.bfloat16)
            codes, scale = int8_reference.quantize_tiles(w)
            x_codes, x_scale = quantize_x(x)
            # The row-wise int8 weight is re-quantised from the -quant tile format, as a model would do.
            rw = rowwise.requantize_tiles_to_rows(codes, scale)
            xr_codes, xr_scale = quantize_rows_int8(x)
            w8, ws8 = fp8.quantize_rows_e4m3(w)
            x8, xs8 = fp8.quantize_rows_e4m3(x)
            reference = torch.matmul(x, w.T)
            paths = {
                "bf16": lambda x=x, w=w: torch.matmul(x, w.T),
                "int8": lambda x=x, c=codes, s=scale: int8_linear(x, c, s, None),
                "int8 gemm": lambda a=x_codes, b=x_scale, c=codes, s=scale: int8_matmul(a, b, c, s),
                "int8 tiles persistent": lambda x=x, c=codes, s=scale: tile_persistent(x, c, s),
                "int8 rw": lambda x=x, c=rw.codes, s=rw.scale: rowwise_linear(x, c, s),
                "int8 rw gemm": lambda a=xr_codes, b=xr_scale, c=rw.codes, s=rw.scale: rowwise_matmul(
                    a, b, c, s
                ),
                "fp8": lambda x=x, c=w8, s=ws8: fp8.fp8_linear(x, c, s, None, use_scaled_mm, fp8_quantize),
                "fp8 mm": lambda a=x8, b=xs8, c=w8, s=ws8: _fp8_matmul(a, b, c, s, use_scaled_mm),
                "fp8 tri": lambda x=x, c=w8, s=ws8: fp8_rowwise(*fp8_quantize(x), c, s),
                "fp8 tri gemm": lambda a=x8, b=xs8, c=w8, s=ws8: fp8_rowwise(a, b, c, s),
            }
            flop = 2 * m * n * k
            times = {name: clock(fn) for name, fn in paths.items()}
            errors = {name: relative_error(fn(), reference) for name, fn in paths.items() if name != "bf16"}
            row = [str(m), label]
            for name, ms in times.items():
                speedup = "" if name == "bf16" else f" x{times['bf16'] / ms:.2f}"
                row.append(f"{ms:.3f} ms {flop / ms / 1e9:.1f}{speedup}")
            row.append(" ".join(f"{errors[name]:.3f}" for name in ERROR_COLUMNS))
            row.append(f"{rw.relative_error:.4f} / {rw.worst_tile_error:.4f}")
            rows.append(row)
            del x, w, codes, scale, x_codes, x_scale, rw, xr_codes, xr_scale, w8, ws8, x8, xs8, reference
    table(["M", "layer", *paths, "err " + " / ".join(ERROR_COLUMNS), "rw requant err / worst tile"], rows)
    headline = [r for r in rows if r[0] == str(tokens[-1]) and r[1] == layers[3][0]] if cuda else []
    if headline:
        cells = ", ".join(f"{name}: {cell}" for name, cell in zip(paths, headline[0][2:]))
        say(f"target: int8 and fp8 >= x{TARGET_SPEEDUP} bf16 at M={tokens[-1]}, K=N=5120: {cells}")
        say()
    if cuda and sweep:
        int8_sweep(device, clock)
        rowwise_sweep(device, Clock(device, warmup=10, rep=40))


ERROR_COLUMNS = ("int8", "int8 tiles persistent", "int8 rw", "fp8", "fp8 tri")


def _int8_paths(cuda: bool):
    if cuda:
        from comfyui_turbodiffusion.turbo_kernels import int8_gemm

        return (
            int8_gemm.w8a8_linear_triton,
            lambda a, b, c, s: int8_gemm.w8a8_matmul_triton(a, b, c, s, None, torch.bfloat16),
            int8_gemm.quantize_tiles_triton,
        )
    return (
        int8_reference.w8a8_linear,
        lambda a, b, c, s: int8_reference.w8a8_matmul(a, b, c, s, torch.bfloat16),
        int8_reference.quantize_tiles,
    )


def _tile_persistent_linear(device: torch.device):
    """x -> bf16 through the Triton tile quantiser and `rowwise_gemm.tile_scaled_matmul` where the row-wise
    kernels run, else the PyTorch reference of the same format (CPU dry run)."""
    if not _rowwise_runs(device, torch.int8):
        return lambda x, codes, scale: int8_reference.w8a8_linear(x, codes, scale, None)
    from comfyui_turbodiffusion.turbo_kernels import int8_gemm

    def linear(x, codes, scale):
        return rowwise.tile_scaled_matmul(*int8_gemm.quantize_tiles_triton(x), codes, scale, None, x.dtype)

    return linear


def _rowwise_runs(device: torch.device, code_dtype: torch.dtype) -> bool:
    return device.type == "cuda" and rowwise.rowwise_gemm_supported(device, code_dtype)


def _rowwise_paths(device: torch.device):
    """(complete linear, GEMM alone, int8 row quantiser) of the row-wise path: the Triton kernels where they
    run, else their PyTorch references (CPU dry run)."""
    if _rowwise_runs(device, torch.int8):
        return rowwise.rowwise_linear, rowwise.rowwise_matmul, rowwise.quantize_rows_int8_triton

    def reference_linear(x, codes, scale):
        return rowwise.rowwise_matmul_reference(*rowwise.quantize_rows_int8(x), codes, scale)

    return reference_linear, rowwise.rowwise_matmul_reference, rowwise.quantize_rows_int8


def _fp8_matmul(a, b, c, s, use_scaled_mm: bool) -> torch.Tensor:
    if use_scaled_mm:
        return fp8.fp8_matmul_scaled_mm(a, b, c, s, torch.bfloat16)
    return fp8.fp8_matmul_reference(a, b, c, s, torch.bfloat16)


def int8_sweep(device: torch.device, clock: Clock) -> None:
    from comfyui_turbodiffusion.turbo_kernels import int8_gemm

    m, k, n = GEMM_TOKENS[-1], 5120, 5120
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    codes, scale = int8_reference.quantize_tiles(torch.randn(n, k, device=device) / math.sqrt(k))
    x_codes, x_scale = int8_gemm.quantize_tiles_triton(x)
    bf16 = clock(lambda: torch.matmul(x, x[:n].T))
    rows = []
    for config in INT8_SWEEP:
        label = f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"
        label += " bit_convert" if config.bit_convert else ""
        try:
            ms = clock(
                lambda c=config: int8_gemm.w8a8_matmul_triton(
                    x_codes, x_scale, codes, scale, None, torch.bfloat16, c
                )
            )
            rows.append([label, f"{ms:.3f}", f"x{bf16 / ms:.2f}"])
        except Exception as error:  # e.g. out of shared memory on smaller GPUs
            rows.append([label, "failed", str(error).splitlines()[0][:60]])
    say(f"int8 GEMM tile configs at M={m}, K=N={k} (bf16 torch.matmul {bf16:.3f} ms; default = first row)")
    table(["config", "ms", "vs bf16"], rows)


def rowwise_sweep(device: torch.device, clock: Clock) -> None:
    """Times `ROWWISE_SWEEP` for int8 and fp8 and `TILE_SWEEP` for the tile-format int8 variant at
    `ROWWISE_SWEEP_SHAPES`, next to bf16 torch.matmul. A config that fails (compile error, too much shared
    memory) prints why and the sweep goes on; err (rel-L2 vs the bf16 product) exposes a config that computes
    garbage."""
    code_dtypes = [dtype for dtype in (torch.int8, fp8.E4M3) if _rowwise_runs(device, dtype)]
    for m, k, n in ROWWISE_SWEEP_SHAPES:
        generator = torch.Generator(device).manual_seed(m + k + n)
        x = torch.randn(m, k, generator=generator, device=device).to(torch.bfloat16)
        w = (torch.randn(n, k, generator=generator, device=device) / math.sqrt(k)).to(torch.bfloat16)
        reference = torch.matmul(x, w.T)
        bf16 = clock(lambda x=x, w=w: torch.matmul(x, w.T))
        rows = []
        for dtype in code_dtypes:
            quantize = rowwise.quantize_rows_int8 if dtype == torch.int8 else fp8.quantize_rows_e4m3
            operands = (*quantize(x), *quantize(w))
            default = rowwise.default_config(device, dtype)
            for config in ROWWISE_SWEEP:
                cells = _time_rowwise_config(rowwise.rowwise_matmul, operands, config, reference, bf16, clock)
                mark = " (default)" if config == default else ""
                rows.append(["int8" if dtype == torch.int8 else "fp8", config.label() + mark, *cells])
            del operands
        if torch.int8 in code_dtypes:
            from comfyui_turbodiffusion.turbo_kernels import int8_gemm

            operands = (*int8_gemm.quantize_tiles_triton(x), *int8_reference.quantize_tiles(w))
            default = rowwise.TILE_SCALED_CONFIGS[rowwise.architecture_family(_capability(device))]
            for config in TILE_SWEEP:
                cells = _time_rowwise_config(_tile_scaled_bf16, operands, config, reference, bf16, clock)
                mark = " (default)" if config == default else ""
                rows.append(["int8 tiles", config.label() + mark, *cells])
            del operands
        say(
            f"Persistent W8A8 GEMM configs (row-wise int8 and fp8, -quant int8 tiles) at M={m}, K={k}, "
            f"N={n} (bf16 torch.matmul {bf16:.3f} ms, "
            f"{2 * m * n * k / bf16 / 1e9:.0f} TFLOPS)"
        )
        table(["type", "config", "ms", "TFLOPS", "vs bf16", "err"], rows)
        del x, w, reference


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _tile_scaled_bf16(a, a_scale, b, b_scale, config) -> torch.Tensor:
    return rowwise.tile_scaled_matmul(a, a_scale, b, b_scale, None, torch.bfloat16, config)


def _time_rowwise_config(
    matmul: Callable, operands: tuple, config, reference: torch.Tensor, bf16: float, clock: Clock
) -> list:
    """[ms, TFLOPS, speed-up, err] of `matmul(*operands, config=config)`, or ["failed", "", "", why]."""
    a, a_scale, b, b_scale = operands
    flop = 2 * a.shape[0] * b.shape[0] * a.shape[1]
    try:
        error = relative_error(matmul(a, a_scale, b, b_scale, config=config), reference)
        ms = clock(lambda: matmul(a, a_scale, b, b_scale, config=config))
    except Exception as failure:  # a config that does not compile or fit must not stop the table
        reason = " ".join(str(failure).split())[:100]
        return ["failed", "", "", f"{type(failure).__name__}: {reason}"]
    return [f"{ms:.3f}", f"{flop / ms / 1e9:.0f}", f"x{bf16 / ms:.2f}", f"{error:.3f}"]


def random_model(config: WanDiTConfig, device: torch.device, seed: int) -> WanDiT:
    """A bf16 WanDiT built directly on `device` with every weight random (no CPU copy, no float32 copy)."""
    with torch.device("meta"):
        model = WanDiT(config, self_attention=sdpa_attention, cross_attention=sdpa_attention)
    model = model.to(torch.bfloat16).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.dim() >= 2 and "modulation" not in name:
                tensor.normal_(0, 1 / math.sqrt(tensor[0].numel()), generator=generator)
            elif "norm" in name and name.endswith("weight"):
                tensor.uniform_(0.8, 1.2, generator=generator)
            else:
                tensor.normal_(0, 0.1, generator=generator)
    return model.requires_grad_(False).eval()


def load_quantisation(config: WanDiTConfig, device: torch.device) -> None:
    """Quantise-at-load as load_dit does it: a bf16 state dict on the CPU, converted layer by layer on the
    GPU."""
    model = random_model(config, device, seed=1)
    weights = {key: value.cpu() for key, value in model.state_dict().items()}
    with torch.device("meta"):
        quantized = WanDiT(config, self_attention=sdpa_attention, cross_attention=sdpa_attention)
    quantize_model_linears_(quantized, "int8")
    names = quantized_linear_names(quantized)
    dense_bytes = tensor_bytes(model)
    del model
    _reset_memory(device)
    start = time.perf_counter()
    convert_linear_weights_(weights, names, "dense", "int8", device, device)
    for key, value in weights.items():
        weights[key] = value.to(device)
    _synchronize(device)
    seconds = time.perf_counter() - start
    int8_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    say(
        f"Load-time int8 quantisation ({config.num_layers} blocks, dim {config.dim}): bf16 model "
        f"{dense_bytes / GIB:.3f} GB on the CPU -> int8 model {int8_bytes / GIB:.3f} GB on {device}; "
        f"peak {peak / GIB:.2f} GB on the GPU; {seconds:.1f} s"
    )
    say()
    del weights
    _reset_memory(device)


def run_step(scenario: Scenario, device: torch.device, attention: str, steps: int) -> list[str]:
    config = scenario.config
    width, height = scenario.size
    shape = latent_shape(width, height, scenario.frames)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    cap = "" if scenario.cap_gb is None else f"{scenario.cap_gb:.3g}"
    row = [scenario.label, scenario.storage, cap]
    model = None
    try:
        model = random_model(config, device, seed=0)
        model.set_self_attention(make_self_attention(attention, 0.1))
        # The block ops `load_dit` gives a model (fused Triton norms on a GPU): the PyTorch ones keep float32
        # temporaries of L x dim that a user's run does not have.
        model.set_block_ops(make_block_ops("auto"))
        if scenario.storage != "dense":
            quantize_model_linears_(model, scenario.storage)
        swapped = 0
        if scenario.cap_gb is not None:
            swapped = plan_block_swap(model, scenario.cap_gb, tokens).swapped_blocks
            if swapped:
                enable_block_swap(model, swapped)
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        _reset_memory(device)
        if scenario.cap_gb is not None and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, scenario.cap_gb * GIB / total), device)
        generator = torch.Generator(device).manual_seed(1)
        x = torch.randn(shape, generator=generator, device=device)
        y = None
        if config.kind == "i2v":
            y = torch.randn((1, config.condition_dim, *shape[2:]), generator=generator, device=device)
        context = torch.randn(1, 512, config.text_dim, generator=generator, device=device).to(torch.bfloat16)
        t = torch.tensor([900.0], device=device)
        with torch.no_grad():
            model(x, t, context, y)  # warm-up: kernel compilation, self-checks
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(x, t, context, y)
            _synchronize(device)
        seconds = (time.perf_counter() - start) / steps
        finite = bool(torch.isfinite(out).all())
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
        activations = estimate_activation_bytes(config, tokens) / GIB
        status = "ok" if finite else "non-finite output"
        if scenario.cap_gb is not None and peak > scenario.cap_gb:
            status += " (over cap)"
        row += [
            str(swapped),
            f"{weights / GIB:.3f}",
            f"{activations:.3f}",
            f"{peak:.2f}",
            f"{seconds:.3f}",
            status,
        ]
    except torch.cuda.OutOfMemoryError as error:
        row += ["", "", "", "", "", f"OOM: {str(error).splitlines()[0][:70]}"]
    except Exception as error:
        traceback.print_exc()
        row += ["", "", "", "", "", f"failed: {error!r}"[:80]]
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        del model
        _reset_memory(device)
    return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def scenarios(dry_run: bool) -> list[Scenario]:
    if dry_run:
        tiny = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64, has_sla_proj=True)
        tiny_i2v = replace(tiny, in_dim=36)
        budget = _dry_run_budget(tiny, (64, 48), 9)
        return [
            Scenario("tiny i2v bf16", tiny_i2v, (64, 48), 9, "dense"),
            Scenario("tiny i2v int8", tiny_i2v, (64, 48), 9, "int8"),
            Scenario("tiny i2v fp8", tiny_i2v, (64, 48), 9, "fp8"),
            Scenario("tiny int8 + swap", tiny, (64, 48), 9, "int8", cap_gb=budget),
        ]
    a14b = WanDiTConfig.from_name("wan2.2-i2v-a14b", has_sla_proj=True)
    small = WanDiTConfig.from_name("wan2.1-t2v-1.3b", has_sla_proj=True)
    return [
        Scenario("A14B 720p", a14b, (1280, 720), 81, "dense"),
        Scenario("A14B 720p", a14b, (1280, 720), 81, "int8"),
        Scenario("A14B 720p", a14b, (1280, 720), 81, "fp8"),
        Scenario("A14B 720p", a14b, (1280, 720), 81, "int8", cap_gb=24),
        Scenario("A14B 720p", a14b, (1280, 720), 81, "dense", cap_gb=24),
        Scenario("1.3B 480p", small, (832, 480), 81, "dense", cap_gb=8),
        Scenario("1.3B 480p", small, (832, 480), 81, "int8", cap_gb=8),
    ]


def _row_name(scenario: Scenario) -> str:
    cap = "" if scenario.cap_gb is None else f" {scenario.cap_gb:g}"
    return f"{scenario.label} {scenario.storage}{cap}"


def _dry_run_budget(config: WanDiTConfig, size: tuple[int, int], frames: int) -> float:
    """A budget that forces the tiny model to swap all but one of its blocks."""
    shape = latent_shape(*size, frames)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    model = random_model(config, torch.device("cpu"), seed=0)
    quantize_model_linears_(model, "int8")
    block = tensor_bytes(model.blocks[0])
    needed = tensor_bytes(model) - block + estimate_activation_bytes(config, tokens)
    return needed / GIB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--attention", default="sagesla", choices=("sagesla", "sla", "sdpa"))
    parser.add_argument("--steps", type=int, default=2, help="timed forwards per scenario")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to skip: gemm, sweep (the GEMM config sweeps), load, steps",
    )
    parser.add_argument(
        "--only",
        default="",
        help="run the DiT-step scenarios whose rows (e.g. 'A14B 720p int8 24') contain one of these "
        "comma-separated strings",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run with --dry-run to check the script on the CPU")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    say(environment_line(device))
    say()
    if "gemm" not in skip:
        tokens = (256, 300) if args.dry_run else GEMM_TOKENS
        layers = (("tiny a", 256, 256), ("tiny b", 384, 256)) if args.dry_run else GEMM_LAYERS
        gemm_table(device, tokens, layers, Clock(device), sweep="sweep" not in skip)
    if "load" not in skip:
        config = (
            scenarios(args.dry_run)[1].config if args.dry_run else WanDiTConfig.from_name("wan2.1-t2v-14b")
        )
        load_quantisation(config, device)
    if "steps" not in skip:
        say(f"DiT step (one forward, batch 1, attention {args.attention}, mean of {args.steps}); GB = GiB")
        wanted = [text for text in args.only.split(",") if text]
        chosen = [s for s in scenarios(args.dry_run) if not wanted or any(w in _row_name(s) for w in wanted)]
        rows = [run_step(scenario, device, args.attention, args.steps) for scenario in chosen]
        header = ["model", "linears", "cap", "swapped", "weights", "est. act.", "peak", "s/step", "status"]
        table(header, rows)
    say(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
