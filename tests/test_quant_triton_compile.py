"""The W8A8 Triton kernels compile for real GPU targets without a GPU (Triton's wheel ships ptxas): int8
tensor-core instructions, a software-pipelined main loop and no register spills for the default config, and
a correctly rounded division without FMA contraction in the quantiser (notes in turbo_kernels/int8_gemm.py).
The compilation runs in a child process (see tests/quant_compile_check.py)."""

from __future__ import annotations

import pytest
from triton_children import json_report

pytest.importorskip("triton.backends.nvidia.compiler")


@pytest.fixture(scope="module")
def report() -> dict:
    return json_report("quant_compile_check.py")


@pytest.mark.parametrize("capability", ["80", "89", "90"])
def test_gemm_compiles_pipelined_without_spills(report, capability):
    gemm = report["gemm"][capability]
    assert gemm["int8_mma"] and gemm["pipelined"]
    assert gemm["spill_bytes"] == 0 and gemm["registers"] <= 255


def test_quantiser_uses_a_correctly_rounded_division_and_no_fma(report):
    assert report["quantiser"] == {"div_rn": True, "fma": False}
