"""bench/memory.py (issue 6, item 4) runs end to end in its CPU dry-run mode: every table is printed and every
scenario (bf16, int8, fp8, int8 + planned block swap) completes with a finite output."""

from __future__ import annotations

from bench_children import BARE_ENV, run_bench


def test_memory_bench_dry_run():
    options = ("--dry-run", "--attention", "sdpa", "--steps", "1")
    out = run_bench("memory.py", *options, env=BARE_ENV)
    assert "GEMM throughput" in out and "Load-time int8 quantisation" in out
    step_rows = [line for line in out.splitlines() if line.strip().startswith("tiny")]
    assert len(step_rows) == 4 and all(line.rstrip().endswith("ok") for line in step_rows), out
    swap_row = next(line for line in step_rows if "swap" in line)
    # Columns: model (3 words), linears, cap, swapped: the budget sends three of the four blocks to the CPU.
    assert swap_row.split()[6] == "3"
