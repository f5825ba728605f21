"""The row-wise W8A8 GEMM (turbo_kernels/rowwise_gemm.py) compiles for Ampere, Ada and Hopper without a GPU
(Triton's wheel ships ptxas), with the default config of each architecture and with and without the GELU
epilogue: int8 dots on int8 tensor cores (wgmma s32.s8.s8 on sm90, mma.sync on sm80/89), fp8 dots on e4m3
tensor cores (wgmma / mma.sync e4m3), TMA loads and stores on sm90, no register spills, shared memory within
the target's limit; and the int8 row quantiser divides correctly rounded, without FMA contraction. The
compilation runs in a child process (tests/rowwise_gemm_compile_check.py)."""

from __future__ import annotations

import pytest
from triton_children import json_report

pytest.importorskip("triton.backends.nvidia.compiler")

# Largest dynamic shared memory of one block: sm80 163 KB, sm89 99 KB, sm90 227 KB (CUDA programming guide).
SHARED_LIMIT = {"sm80": 163 * 1024, "sm89": 99 * 1024, "sm90": 227 * 1024}


@pytest.fixture(scope="module")
def report() -> dict:
    return json_report("rowwise_gemm_compile_check.py")


def test_every_default_config_compiles_on_tensor_cores_without_spills(report):
    gemms = {name: variant for name, variant in report.items() if name.startswith("gemm/")}
    assert len(gemms) == 10  # int8 on sm80/89/90, fp8 on sm89/90, each with and without GELU
    for name, variant in gemms.items():
        arch = name.split("/")[2]
        assert variant["tensor_core"], name
        assert variant["spill_bytes"] == 0 and variant["registers"] <= 255, (name, variant)
        assert variant["shared_bytes"] <= SHARED_LIMIT[arch], (name, variant)
        assert variant["tma"] == (arch == "sm90"), name


def test_int8_row_quantiser_divides_correctly_rounded_without_fma(report):
    quantisers = {name: variant for name, variant in report.items() if name.startswith("int8_row_quantiser")}
    assert len(quantisers) == 3
    for name, variant in quantisers.items():
        assert variant["div_rn"] and not variant["fma"], name
        assert variant["spill_bytes"] == 0, name
