"""The fused norm / RoPE / residual kernels compile for Ampere and Hopper without a GPU (Triton's wheel ships
ptxas), at the row widths of both Wan sizes: no register spills, vectorised loads where rows are aligned, and
no FMA contraction (products and sums round separately, as the PyTorch operations they replace). Also the
fp8 activation quantiser (turbo_kernels/fp8_quant.py) for sm90 at the Wan linears' widths. The compilation
runs in a child process (see tests/fused_norms_compile_check.py)."""

from __future__ import annotations

import pytest
from triton_children import json_report

pytest.importorskip("triton.backends.nvidia.compiler")


@pytest.fixture(scope="module")
def report() -> dict:
    return json_report("fused_norms_compile_check.py")


def test_every_variant_compiles_without_spills_or_fma(report):
    assert len(report) == 6 * 2 * 2 + 2 * 2 + 3
    for name, variant in report.items():
        assert variant["spill_bytes"] == 0 and variant["registers"] <= 255, (name, variant)
        assert not variant["fma"], name


def test_fp8_quantiser_divides_correctly_rounded_and_converts_on_hardware(report):
    quantisers = {name: variant for name, variant in report.items() if name.startswith("fp8_row_quantiser")}
    assert len(quantisers) == 3
    for name, variant in quantisers.items():
        assert variant["div_rn"] and variant["e4m3_cvt"], name


def test_norms_emitting_e4m3_divide_correctly_rounded_and_convert_on_hardware(report):
    norms = {name: variant for name, variant in report.items() if "_norm_e4m3/" in name}
    assert len(norms) == 4
    for name, variant in norms.items():
        assert variant["div_rn"] and variant["e4m3_cvt"], name


def test_row_loads_are_vectorised(report):
    for name, variant in report.items():
        assert variant["vector_loads"], name
