"""Runs tests/fp8_quant_interpret_cases.py (the Triton e4m3 activation quantiser on the CPU interpreter) in
a child pytest with TRITON_INTERPRET=1 set before Triton is imported (as test_quant_triton_interpret.py)."""

from __future__ import annotations

import pytest
from triton_children import run_interpreted_cases

pytest.importorskip("triton")


def test_triton_fp8_quantiser_under_the_interpreter():
    run_interpreted_cases("fp8_quant_interpret_cases.py")
