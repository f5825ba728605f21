"""Compiles the row-wise W8A8 GEMM (`turbo_kernels/rowwise_gemm.py`) with its default configs, and its int8
row quantiser, for GPU targets on a machine without a GPU, and prints as JSON what
tests/test_rowwise_gemm_compile.py checks (child process, as tests/quant_compile_check.py)."""

from __future__ import annotations

import json
import re

import torch
from comfyui_turbodiffusion.turbo_kernels import row_quant, rowwise_gemm
from ptx_compile import (
    compile_for,
    divisible_by_16,
    persistent_gemm_constexprs,
    persistent_gemm_signature,
    ptxas_usage,
)
from triton.compiler import ASTSource

# (capability, architecture family, operand types): fp8 needs sm89+.
TARGETS = ((80, "ampere", ("i8",)), (89, "consumer", ("i8", "fp8e4nv")), (90, "hopper", ("i8", "fp8e4nv")))
TORCH_DTYPES = {"i8": torch.int8, "fp8e4nv": torch.float8_e4m3fn}


def operand_types(code: str, config: rowwise_gemm.RowwiseGemmConfig) -> dict[str, str]:
    if not config.descriptors:
        return {"a": f"*{code}", "b": f"*{code}", "out": "*bf16"}
    store_n = config.block_n // 2 if config.split_epilogue else config.block_n
    return {
        "a": f"tensordesc<{code}[{config.block_m}, {config.block_k}]>",
        "b": f"tensordesc<{code}[{config.block_n}, {config.block_k}]>",
        "out": f"tensordesc<bf16[{config.block_m}, {store_n}]>",
    }


def gemm_report(capability: int, family: str, code: str, gelu: bool) -> dict:
    config = rowwise_gemm.DEFAULT_CONFIGS[family][TORCH_DTYPES[code]]
    constexprs = {
        "HAS_BIAS": True,
        "GELU": gelu,
        "INTEGER": code == "i8",
        "DESCRIPTORS": config.descriptors,
        "EVEN_K": True,
        **persistent_gemm_constexprs(config),
        "SOFTWARE_BF16": False,
    }
    signature = persistent_gemm_signature(operand_types(code, config), constexprs)
    source = ASTSource(rowwise_gemm._rowwise_gemm_kernel, signature, constexprs, divisible_by_16(signature))
    kernel = compile_for(source, capability, {"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptx = kernel.asm["ptx"]
    operands = ".s32.s8.s8" if code == "i8" else ".e4m3.e4m3"
    instruction = "wgmma.mma_async" if capability >= 90 else "mma.sync"
    return {
        "config": config.label(),
        "tensor_core": bool(re.search(re.escape(instruction) + r"\S*" + re.escape(operands), ptx)),
        "tma": "cp.async.bulk.tensor" in ptx,
        "shared_bytes": kernel.metadata.shared,
        **ptxas_usage(ptx, capability),
    }


def quantiser_report(width: int) -> dict:
    signature = {
        "x_ptr": "*bf16",
        "codes_ptr": "*i8",
        "scale_ptr": "*fp32",
        **dict.fromkeys(("M", "K", "stride_xm"), "i32"),
        **dict.fromkeys(("LEVELS", "INTEGER", "ROWS", "BLOCK_K", "INTERPRET"), "constexpr"),
    }
    rows, block_k = row_quant.launch_config(width)
    constexprs = {"LEVELS": rowwise_gemm.INT8_LEVELS, "INTEGER": True, "ROWS": rows, "BLOCK_K": block_k}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 4, 5)}
    source = ASTSource(row_quant.quantize_rows_kernel, signature, {**constexprs, "INTERPRET": False}, aligned)
    ptx = compile_for(source, 90, {"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
    return {"div_rn": "div.rn.f32" in ptx, "fma": "fma.rn.f32" in ptx, **ptxas_usage(ptx, 90)}


def main() -> None:
    report = {}
    for capability, family, codes in TARGETS:
        for code in codes:
            for gelu in (False, True):
                key = f"gemm/{code}/sm{capability}{'/gelu' if gelu else ''}"
                report[key] = gemm_report(capability, family, code, gelu)
    for width in (1536, 5120, 13824):
        report[f"int8_row_quantiser/{width}/sm90"] = quantiser_report(width)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
