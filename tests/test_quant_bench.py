"""bench/memory.py (issue 6, item 4) runs end to end in its CPU dry-run mode: every table is printed and every
scenario (bf16, int8, fp8, int8 + planned block swap) completes with a finite output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "memory.py"


def test_memory_bench_dry_run():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--attention", "sdpa", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "GEMM throughput" in out and "Load-time int8 quantisation" in out
    step_rows = [line for line in out.splitlines() if line.strip().startswith("tiny")]
    assert len(step_rows) == 4 and all(line.rstrip().endswith("ok") for line in step_rows), out
    swap_row = next(line for line in step_rows if "swap" in line)
    # Columns: model (3 words), linears, cap, swapped: the budget sends three of the four blocks to the CPU.
    assert swap_row.split()[6] == "3"
