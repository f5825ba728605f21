"""Runs tests/fused_norms_interpret_cases.py (the fused norm / RoPE / residual kernels on the CPU interpreter,
and a tiny DiT with them injected) in a child pytest with TRITON_INTERPRET=1 set before Triton is imported;
in this process Triton may already be imported in compiled mode by other tests, and then its interpreter
cannot run kernels."""

from __future__ import annotations

import pytest
from triton_children import run_interpreted_cases

pytest.importorskip("triton")


def test_fused_norm_kernels_under_the_interpreter():
    run_interpreted_cases("fused_norms_interpret_cases.py")
