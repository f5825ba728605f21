"""Compiling a Triton kernel for a GPU target on a machine without a GPU (Triton's wheel ships ptxas), for the
compile-only checks (tests/*_compile_check.py), which run as child processes."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

ARCHITECTURES = {80: "sm_80", 89: "sm_89", 90: "sm_90a"}


def compile_for(source: ASTSource, capability: int, options: dict):
    """The compiled kernel for compute capability `capability` (8.0 as 80); its `asm` holds PTX and TTGIR."""
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def ptxas_usage(ptx: str, capability: int) -> dict:
    """Spill bytes and registers per thread that ptxas reports for the PTX (None where it says nothing)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        ptxas = [get_ptxas(capability).path, "-v", f"-arch={ARCHITECTURES[capability]}", str(path)]
        report = subprocess.run(ptxas, capture_output=True, text=True, cwd=folder).stderr
    spills = re.search(r"(\d+) bytes spill stores", report)
    registers = re.search(r"Used (\d+) registers", report)
    return {
        "spill_bytes": int(spills.group(1)) if spills else None,
        "registers": int(registers.group(1)) if registers else None,
    }


def divisible_by_16(signature: dict, sizes: tuple[str, ...] = ("M", "N", "K")) -> dict:
    """The `tt.divisibility` attributes the launcher gives real tensors: every pointer argument of `signature`
    and the integer arguments named in `sizes` specialised as multiples of 16 (every Wan shape)."""
    return {
        (index,): [["tt.divisibility", 16]]
        for index, (name, kind) in enumerate(signature.items())
        if kind.startswith("*") or name in sizes
    }


def persistent_gemm_constexprs(config) -> dict:
    """The constexprs a `rowwise_gemm.RowwiseGemmConfig` decides for the persistent GEMM kernels."""
    return {
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "GROUP_M": config.group_m,
        "FLATTEN": config.flatten,
        "SPLIT_EPILOGUE": config.split_epilogue,
    }


def persistent_gemm_signature(operands: dict, constexprs: dict) -> dict:
    """The argument types of the persistent GEMM kernels (`rowwise_gemm`): the operands a, b, out as given,
    fp32 scale pointers, a bf16 bias pointer, i32 M, N, K, then every name of `constexprs` as a constexpr."""
    return {
        **operands,
        **dict.fromkeys(("a_scale_ptr", "b_scale_ptr"), "*fp32"),
        "bias_ptr": "*bf16",
        **dict.fromkeys(("M", "N", "K"), "i32"),
        **dict.fromkeys(constexprs, "constexpr"),
    }
