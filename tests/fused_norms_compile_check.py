"""Compiles the fused norm kernels (and the fp8 activation quantiser of the same issue) for GPU targets on a
machine without a GPU and prints, as JSON, what tests/test_fused_norms_compile.py checks (child process, as
tests/quant_compile_check.py)."""

from __future__ import annotations

import json
import re

from comfyui_turbodiffusion.turbo_kernels import fused_norms, row_quant
from comfyui_turbodiffusion.turbo_kernels.fp8_linear import E4M3_MAX
from ptx_compile import compile_for, ptxas_usage
from triton.compiler import ASTSource

CAPABILITIES = (80, 90)
# Row widths of the 1.3B (1536) and 14B (5120) models: padded blocks and warps as the wrappers launch them.
WIDTHS = {1536: (2048, 4), 5120: (8192, 8)}
LAYER_NORM = {
    **dict.fromkeys(("x_ptr", "residual_ptr"), "*bf16"),
    **dict.fromkeys(("gate_ptr", "weight_ptr", "bias_ptr", "shift_ptr", "scale_ptr"), "*fp32"),
    **dict.fromkeys(("x_out_ptr", "out_ptr"), "*bf16"),
    "codes_ptr": "*bf16",  # a placeholder (x) where the kernel writes no codes
    "row_scale_ptr": "*fp32",
    **dict.fromkeys(("tokens", "width", "vector_batch_stride"), "i32"),
    "eps": "fp32",
    **dict.fromkeys(("BLOCK", "RESIDUAL", "GATED", "AFFINE", "MODULATE", "QUANTIZE"), "constexpr"),
    **dict.fromkeys(("SOFTWARE_BF16", "INTERPRET"), "constexpr"),
}
RMS_ROPE = {
    "x_ptr": "*bf16",
    **dict.fromkeys(("weight_ptr", "cos_ptr", "sin_ptr"), "*fp32"),
    "out_ptr": "*bf16",
    **dict.fromkeys(("tokens", "width", "half_head"), "i32"),
    "eps": "fp32",
    **dict.fromkeys(("BLOCK_PAIRS", "ROPE", "SOFTWARE_BF16"), "constexpr"),
}
GATED_ADD = {
    **dict.fromkeys(("x_ptr", "y_ptr"), "*bf16"),
    "gate_ptr": "*fp32",
    "out_ptr": "*bf16",
    **dict.fromkeys(("tokens", "width", "gate_batch_stride"), "i32"),
    **dict.fromkeys(("BLOCK", "SOFTWARE_BF16"), "constexpr"),
}
FP8_QUANTISER = {
    "x_ptr": "*bf16",
    "codes_ptr": "*fp8e4nv",
    "scale_ptr": "*fp32",
    **dict.fromkeys(("M", "K", "stride_xm"), "i32"),
    **dict.fromkeys(("LEVELS", "INTEGER", "ROWS", "BLOCK_K", "INTERPRET"), "constexpr"),
}
# Reduction widths K of the Wan linears' activations: 1536 / 5120 (q/k/v/o, FFN up), 8960 / 13824 (FFN down).
FP8_WIDTHS = (1536, 5120, 13824)
LAYER_NORM_E4M3 = {**LAYER_NORM, "codes_ptr": "*fp8e4nv"}
FP8_NORMS = {
    "modulated_norm_e4m3": dict(MODULATE=True),
    "gated_add_affine_norm_e4m3": dict(RESIDUAL=True, GATED=True, AFFINE=True),
}
# The launcher specialises pointers and integers divisible by 16 (every Wan width and batch stride).
ALIGNED = {"width", "vector_batch_stride", "gate_batch_stride", "K", "stride_xm"}


def compile_report(kernel, signature: dict, constexprs: dict, warps: int, capability: int) -> dict:
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(signature)
        if name.endswith("_ptr") or name in ALIGNED
    }
    flags = {flag: False for flag in ("INTERPRET", "SOFTWARE_BF16") if flag in signature}
    source = ASTSource(kernel, signature, {**constexprs, **flags}, aligned)
    options = {"num_warps": warps, "enable_fp_fusion": False}
    ptx = compile_for(source, capability, options).asm["ptx"]
    return {
        "fma": "fma.rn.f32" in ptx,
        "div_rn": "div.rn.f32" in ptx,
        "e4m3_cvt": "cvt.rn.satfinite.e4m3x2.f32" in ptx,
        "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v[24]", ptx)),
        **ptxas_usage(ptx, capability),
    }


def main() -> None:
    variants = {
        "modulated_norm": (fused_norms._layer_norm_kernel, LAYER_NORM, dict(MODULATE=True)),
        "gated_add_affine_norm": (
            fused_norms._layer_norm_kernel,
            LAYER_NORM,
            dict(RESIDUAL=True, GATED=True, AFFINE=True),
        ),
        "add_modulated_norm": (
            fused_norms._layer_norm_kernel,
            LAYER_NORM,
            dict(RESIDUAL=True, MODULATE=True),
        ),
        "rms_norm_rope": (fused_norms._rms_norm_rope_kernel, RMS_ROPE, dict(ROPE=True)),
        "rms_norm": (fused_norms._rms_norm_rope_kernel, RMS_ROPE, dict(ROPE=False)),
        "gated_add": (fused_norms._gated_add_kernel, GATED_ADD, {}),
    }
    defaults = dict(RESIDUAL=False, GATED=False, AFFINE=False, MODULATE=False, QUANTIZE=False)
    results = {}
    for name, (kernel, signature, flags) in variants.items():
        for width, (block, warps) in WIDTHS.items():
            for capability in CAPABILITIES:
                if kernel is fused_norms._layer_norm_kernel:
                    constexprs = {**defaults, **flags, "BLOCK": block}
                elif kernel is fused_norms._rms_norm_rope_kernel:
                    constexprs = {**flags, "BLOCK_PAIRS": block // 2}
                else:
                    constexprs = {"BLOCK": block}
                key = f"{name}/{width}/sm{capability}"
                results[key] = compile_report(kernel, signature, constexprs, warps, capability)
    # The norms that feed fp8 linears emit e4m3 codes themselves (FP8 GPUs only: sm89+).
    for name, flags in FP8_NORMS.items():
        for width, (block, warps) in WIDTHS.items():
            constexprs = {**defaults, **flags, "QUANTIZE": True, "BLOCK": block}
            results[f"{name}/{width}/sm90"] = compile_report(
                fused_norms._layer_norm_kernel, LAYER_NORM_E4M3, constexprs, warps, 90
            )
    for width in FP8_WIDTHS:
        rows, block_k = row_quant.launch_config(width)
        constexprs = {"LEVELS": E4M3_MAX, "INTEGER": False, "ROWS": rows, "BLOCK_K": block_k}
        results[f"fp8_row_quantiser/{width}/sm90"] = compile_report(
            row_quant.quantize_rows_kernel, FP8_QUANTISER, constexprs, 4, 90
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
