"""Runs tests/fused_norms_interpret_cases.py (the fused norm / RoPE / residual kernels on the CPU interpreter,
and a tiny DiT with them injected) in a child pytest with TRITON_INTERPRET=1 set before Triton is imported;
in this process Triton may already be imported in compiled mode by other tests, and then its interpreter
cannot run kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "fused_norms_interpret_cases.py"


def test_fused_norm_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
