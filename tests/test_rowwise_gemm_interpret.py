"""Runs tests/rowwise_gemm_interpret_cases.py (the row-wise W8A8 GEMM and int8 row quantiser on the CPU
interpreter) in a child pytest with TRITON_INTERPRET=1 set before Triton is imported."""

from __future__ import annotations

import pytest
from triton_children import run_interpreted_cases

pytest.importorskip("triton")


def test_rowwise_gemm_kernels_under_the_interpreter():
    run_interpreted_cases("rowwise_gemm_interpret_cases.py")
