"""Compiles the tile-scale int8 GEMM of `turbo_kernels/rowwise_gemm.py` (`tile_scaled_matmul`) for sm90 on a
machine without a GPU, with its Hopper default launch and the bench's sweep candidates, and prints as JSON
what tests/test_tile_gemm_compile.py checks (child process, as tests/rowwise_gemm_compile_check.py)."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace

from comfyui_turbodiffusion.turbo_kernels import rowwise_gemm
from ptx_compile import (
    compile_for,
    divisible_by_16,
    persistent_gemm_constexprs,
    persistent_gemm_signature,
    ptxas_usage,
)
from triton.compiler import ASTSource

DEFAULT = rowwise_gemm.TILE_SCALED_CONFIGS["hopper"]
# Launches to compile: the Hopper default and three of the bench sweep's candidates.
CONFIGS = {
    "default": DEFAULT,
    "w8": replace(DEFAULT, num_warps=8, programs_per_sm=1),
    "m64": replace(DEFAULT, block_m=64),
    "w8-bits": replace(DEFAULT, num_warps=8, programs_per_sm=1, bit_convert=True),
}


def report(config: rowwise_gemm.RowwiseGemmConfig, with_bias: bool) -> dict:
    store_n = config.block_n // 2 if config.split_epilogue else config.block_n
    constexprs = {
        "HAS_BIAS": with_bias,
        "BIT_CONVERT": config.bit_convert,
        "OUT_DTYPE": rowwise_gemm.TILE_SCALED_OUT_DTYPES[rowwise_gemm.torch.bfloat16],
        "DESCRIPTORS": True,
        "EVEN_K": True,
        **persistent_gemm_constexprs(config),
        "SOFTWARE_BF16": False,
    }
    operands = {
        "a": f"tensordesc<i8[{config.block_m}, {config.block_k}]>",
        "b": f"tensordesc<i8[{config.block_n}, {config.block_k}]>",
        "out": f"tensordesc<bf16[{config.block_m}, {store_n}]>",
    }
    signature = persistent_gemm_signature(operands, constexprs)
    source = ASTSource(
        rowwise_gemm._tile_scaled_gemm_kernel, signature, constexprs, divisible_by_16(signature)
    )
    kernel = compile_for(source, 90, {"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptx = kernel.asm["ptx"]
    return {
        "config": config.label(),
        "igmma": bool(re.search(r"wgmma\.mma_async\S*\.s32\.s8\.s8", ptx)),
        "tma": "cp.async.bulk.tensor" in ptx,
        "int_to_float_conversions": len(re.findall(r"cvt\.rn\.f32\.s32", ptx)),
        "shared_bytes": kernel.metadata.shared,
        **ptxas_usage(ptx, 90),
    }


def main() -> None:
    names = sys.argv[1:] or list(CONFIGS)
    result = {
        f"{name}{'/bias' if with_bias else ''}": report(CONFIGS[name], with_bias)
        for name in names
        for with_bias in (False, True)
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
