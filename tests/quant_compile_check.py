"""Compiles the W8A8 Triton kernels for GPU targets on a machine without a GPU and prints, as JSON, what
tests/test_quant_triton_compile.py checks. It runs as a child process so that the compiler's state stays out
of the test process."""

from __future__ import annotations

import json

from comfyui_turbodiffusion.turbo_kernels import int8_gemm
from ptx_compile import compile_for, ptxas_usage
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
        ("HAS_BIAS", "EVEN_K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "BIT_CONVERT", "SOFTWARE_BF16"),
        "constexpr",
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
CAPABILITIES = (80, 89, 90)


def gemm_report(capability: int) -> dict:
    config = int8_gemm.DEFAULT_CONFIG
    constexprs = {
        "HAS_BIAS": True,
        "EVEN_K": True,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": int8_gemm.TILE,
        "GROUP_M": config.group_m,
        "BIT_CONVERT": config.bit_convert,
        "SOFTWARE_BF16": False,
    }
    source = ASTSource(int8_gemm._w8a8_gemm_kernel, GEMM_SIGNATURE, constexprs, DIVISIBLE_BY_16)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = compile_for(source, capability, options)
    ptx = kernel.asm["ptx"]
    return {
        "int8_mma": ".s8" in ptx and ("wgmma" in ptx if capability >= 90 else "mma.sync" in ptx),
        "pipelined": "async_copy_global_to_local" in kernel.asm["ttgir"],
        **ptxas_usage(ptx, capability),
    }


def quantiser_report() -> dict:
    source = ASTSource(int8_gemm._quantize_tiles_kernel, QUANTISER_SIGNATURE, {"TILE_SIZE": int8_gemm.TILE})
    options = {"num_warps": 8, "enable_fp_fusion": False}
    ptx = compile_for(source, 89, options).asm["ptx"]
    return {"div_rn": "div.rn.f32" in ptx, "fma": "fma" in ptx}


if __name__ == "__main__":
    gemm = {str(capability): gemm_report(capability) for capability in CAPABILITIES}
    print(json.dumps({"gemm": gemm, "quantiser": quantiser_report()}))
