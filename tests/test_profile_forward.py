"""bench/profile_forward.py: the dry run profiles a tiny DiT on the CPU and prints the category table and the
top operators; kernel names seen on Hopper land in the intended categories."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from bench_children import run_bench

ROOT = Path(__file__).resolve().parents[1]
CATEGORY_ROWS = (
    "attention",
    "GEMM",
    "activation quantisers",
    "norm / RoPE / residual",
    "element-wise / casts",
)


def _run(*options: str) -> str:
    return run_bench("profile_forward.py", "--dry-run", *options, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _table(stdout: str) -> dict[str, float]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in (*CATEGORY_ROWS, "other"):
            rows[cells[0]] = float(cells[1])
    return rows


def test_dry_run_prints_categories_and_top_operators(tmp_path):
    trace = tmp_path / "trace.json"
    stdout = _run("--top", "5", "--trace", str(trace))
    rows = _table(stdout)
    assert set(rows) == {*CATEGORY_ROWS, "other"}
    assert rows["GEMM"] > 0 and rows["attention"] > 0  # the linears and the attention ran and were timed
    assert "forward wall time:" in stdout and "top 5 kernels" in stdout
    assert "| aten::addmm | GEMM |" in stdout or "| aten::mm | GEMM |" in stdout
    assert trace.stat().st_size > 0


def test_dry_run_with_fp8_linears_and_pytorch_block_ops():
    stdout = _run("--linear-quant", "fp8", "--block-ops", "torch", "--attention", "sdpa", "--top", "3")
    assert "linear fp8, block ops torch, attention sdpa" in stdout
    assert _table(stdout)["GEMM"] > 0


def test_hopper_kernel_names_are_categorised():
    spec = importlib.util.spec_from_file_location("profile_forward", ROOT / "bench" / "profile_forward.py")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault("profile_forward", module)  # its dataclass looks its module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    expected = {
        "_sparse_attention_kernel": "attention",
        "_pool_quantise_kernel": "attention",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>": "attention",
        "nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNT": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "GEMM",
        "_w8a8_gemm_kernel": "GEMM",
        "quantize_rows_kernel": "activation quantisers",
        "_layer_norm_kernel": "norm / RoPE / residual",
        "_rms_norm_rope_kernel": "norm / RoPE / residual",
        "_gated_add_kernel": "norm / RoPE / residual",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": (
            "element-wise / casts"
        ),
        "Memset (Device)": "other",
    }
    assert {name: module.categorise(name) for name in expected} == expected
