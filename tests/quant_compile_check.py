"""Compiles the W8A8 Triton kernels for GPU targets on a machine without a GPU and prints, as JSON, what
tests/test_quant_triton_compile.py checks. It runs as a child process so that the compiler's state stays out
of the test process."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from comfyui_turbodiffusion.turbo_kernels import int8_gemm
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

GEMM_SIGNATURE = {
    "a_ptr": "*i8",
    "w_ptr": "*i8",
    "a_scale_ptr": "*fp32",
    "w_scale_ptr": "*fp32",
    "bias_ptr": "*bf16",
    "out_ptr": "*bf16",
    "M": "i32",
    "N": "i32",
    "K": "i32",
    "k_tiles": "i32",
    **dict.fromkeys(
        ("HAS_BIAS", "EVEN_K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SOFTWARE_BF16"), "constexpr"
    ),
}
QUANTISER_SIGNATURE = {
    "x_ptr": "*bf16",
    "codes_ptr": "*i8",
    "scale_ptr": "*fp32",
    "M": "i32",
    "K": "i32",
    "stride_xm": "i32",
    "scale_columns": "i32",
    "TILE_SIZE": "constexpr",
}
# The launcher specialises 16-divisible pointers and sizes (every Wan shape); without it nothing pipelines.
DIVISIBLE_BY_16 = {(index,): [["tt.divisibility", 16]] for index in range(9)}
TARGETS = {80: "sm_80", 89: "sm_89", 90: "sm_90a"}


def gemm_report(capability: int) -> dict:
    config = int8_gemm.DEFAULT_CONFIG
    constexprs = {
        "HAS_BIAS": True,
        "EVEN_K": True,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": int8_gemm.TILE,
        "GROUP_M": config.group_m,
        "SOFTWARE_BF16": False,
    }
    source = ASTSource(int8_gemm._w8a8_gemm_kernel, GEMM_SIGNATURE, constexprs, DIVISIBLE_BY_16)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        ptxas = [get_ptxas(capability).path, "-v", f"-arch={TARGETS[capability]}", str(path)]
        report = subprocess.run(ptxas, capture_output=True, text=True, cwd=folder).stderr
    spills = re.search(r"(\d+) bytes spill stores", report)
    registers = re.search(r"Used (\d+) registers", report)
    return {
        "int8_mma": ".s8" in ptx and ("wgmma" in ptx if capability >= 90 else "mma.sync" in ptx),
        "pipelined": "async_copy_global_to_local" in kernel.asm["ttgir"],
        "spill_bytes": int(spills.group(1)) if spills else None,
        "registers": int(registers.group(1)) if registers else None,
    }


def quantiser_report() -> dict:
    source = ASTSource(int8_gemm._quantize_tiles_kernel, QUANTISER_SIGNATURE, {"TILE_SIZE": int8_gemm.TILE})
    options = {"num_warps": 8, "enable_fp_fusion": False}
    ptx = triton.compile(source, target=GPUTarget("cuda", 89, 32), options=options).asm["ptx"]
    return {"div_rn": "div.rn.f32" in ptx, "fma": "fma" in ptx}


if __name__ == "__main__":
    gemm = {str(capability): gemm_report(capability) for capability in TARGETS}
    print(json.dumps({"gemm": gemm, "quantiser": quantiser_report()}))
