"""Runs tests/tile_gemm_interpret_cases.py (`rowwise_gemm.tile_scaled_matmul`, the exact `-quant` int8 GEMM
on the persistent kernel, on the CPU interpreter) in a child pytest with TRITON_INTERPRET=1 set before Triton
is imported."""

from __future__ import annotations

import pytest
from triton_children import run_interpreted_cases

pytest.importorskip("triton")


def test_tile_scaled_gemm_under_the_interpreter():
    run_interpreted_cases("tile_gemm_interpret_cases.py")
