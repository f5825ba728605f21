"""The W8A8 Triton kernels compile for real GPU targets without a GPU (Triton's wheel ships ptxas): int8
tensor-core instructions, a software-pipelined main loop and no register spills for the default config, and
a correctly rounded division without FMA contraction in the quantiser (notes in turbo_kernels/int8_gemm.py).
The compilation runs in a child process (see tests/quant_compile_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")
CHECK = Path(__file__).with_name("quant_compile_check.py")


@pytest.fixture(scope="module")
def report() -> dict:
    result = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("capability", ["80", "89", "90"])
def test_gemm_compiles_pipelined_without_spills(report, capability):
    gemm = report["gemm"][capability]
    assert gemm["int8_mma"] and gemm["pipelined"]
    assert gemm["spill_bytes"] == 0 and gemm["registers"] <= 255


def test_quantiser_uses_a_correctly_rounded_division_and_no_fma(report):
    assert report["quantiser"] == {"div_rn": True, "fma": False}
