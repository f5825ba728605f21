"""Runs tests/quant_interpret_cases.py (the Triton W8A8 kernels on the CPU interpreter) in a child pytest with
TRITON_INTERPRET=1 set before Triton is imported; in this process Triton may already be imported in compiled
mode by other tests, and then its interpreter cannot run kernels."""

from __future__ import annotations

import pytest
from triton_children import run_interpreted_cases

pytest.importorskip("triton")


def test_triton_w8a8_kernels_under_the_interpreter():
    run_interpreted_cases("quant_interpret_cases.py")
