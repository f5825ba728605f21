"""The VAE's channels-last Triton kernels (fused RMS-norm + SiLU with bias, bias + residual, nearest 2x
upsampling) on Triton's CPU interpreter against float64 formulas (tests/vae_kernel_checks.py, run in a
subprocess because TRITON_INTERPRET must be set before the kernels are defined).

Errors are in units of one rounding of the result to its dtype (vae_kernel_checks.rounding_error): the
kernels compute in float32 and round once. float32 results (whose own float32 arithmetic is the error) must
be within 20 units; bf16 within 2, because the interpreter truncates when it converts float32 to bf16
(Triton 3.9, seen 2026-11: every error points towards zero) where the GPU rounds to nearest. The upsampling
copies, so it must be exact.
"""

from __future__ import annotations

import pytest
from triton_children import TESTS, json_report

TOLERANCES = {"torch.float32": 20.0, "torch.bfloat16": 2.0}


@pytest.fixture(scope="module")
def errors() -> dict[str, dict[str, float]]:
    return json_report("vae_kernel_checks.py", {"TRITON_INTERPRET": "1", "PYTHONPATH": str(TESTS)})


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_kernels_match_float64_formulas(errors, dtype):
    for check, error in errors[dtype].items():
        if check.startswith("upsample") or check.endswith(("untouched", "channels-last")):
            assert error == 0, f"{dtype} {check}"
        else:
            assert error <= TOLERANCES[dtype], f"{dtype} {check}: {error}"
