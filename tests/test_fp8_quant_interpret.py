"""Runs tests/fp8_quant_interpret_cases.py (the Triton e4m3 activation quantiser on the CPU interpreter) in
a child pytest with TRITON_INTERPRET=1 set before Triton is imported (as test_quant_triton_interpret.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "fp8_quant_interpret_cases.py"


def test_triton_fp8_quantiser_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
