"""The tile-scale int8 GEMM of turbo_kernels/rowwise_gemm.py (`tile_scaled_matmul`) compiles for sm90 without
a GPU (Triton's wheel ships ptxas): int8 wgmma (s32.s8.s8), TMA, shared memory for two programs per SM where
the launch asks for them. The child process is tests/tile_gemm_compile_check.py."""

from __future__ import annotations

import pytest
from triton_children import json_report

pytest.importorskip("triton.backends.nvidia.compiler")

SM90_SHARED_PER_SM = 228 * 1024  # of which 1 KB per resident block is reserved (CUDA programming guide)


@pytest.fixture(scope="module")
def report() -> dict:
    return json_report("tile_gemm_compile_check.py")


def test_every_launch_compiles_to_int8_wgmma_with_tma(report):
    assert len(report) == 8  # four launches, with and without bias
    for name, variant in report.items():
        assert variant["igmma"] and variant["tma"], name
        assert variant["registers"] <= 255, (name, variant)
        programs = 2 if "x2" in variant["config"] else 1
        assert programs * (variant["shared_bytes"] + 1024) <= SM90_SHARED_PER_SM, (name, variant)


def test_spills_only_where_a_4_warp_program_holds_two_128x128_tiles(report):
    # 8 warps, or 64-row tiles with 4 warps: 64 registers per thread for each of the int32 partial tile and
    # the float32 accumulator, no spills. The Hopper default (128×128, 4 warps) needs 2 × 128 and spills a
    # little (Triton 3.9); the bench sweep times it against the others.
    for name in ("w8", "w8/bias", "m64", "m64/bias", "w8-bits", "w8-bits/bias"):
        assert report[name]["spill_bytes"] == 0, (name, report[name])
    for name in ("default", "default/bias"):
        assert report[name]["spill_bytes"] <= 256, (name, report[name])


def test_bit_convert_leaves_no_conversion_instruction_in_the_k_loop(report):
    # Each K step converts a whole int32 tile: as I2F (cvt.rn.f32.s32, a quarter of the float32 rate on sm90)
    # unless bit_convert asks for the integer-add-and-subtract form.
    for name in ("w8", "w8/bias"):
        assert report[name]["int_to_float_conversions"] >= 64, (name, report[name])
    for name in ("w8-bits", "w8-bits/bias"):
        assert report[name]["int_to_float_conversions"] == 0, (name, report[name])
