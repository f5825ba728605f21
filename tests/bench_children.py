"""Running a benchmark script (bench/<name>.py) in a child Python, for the tests of its CPU dry run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Nothing inherited from the test process (no PYTHONPATH, no CUDA settings), one thread.
BARE_ENV = {"OMP_NUM_THREADS": "1", "PATH": ""}


def run_bench(
    script: str, *options: str, env: dict[str, str], timeout: int = 300, cwd: Path | None = None
) -> str:
    """Runs bench/<script> with `options` in environment `env`; returns its standard output once it exits
    cleanly (else fails with the ends of both outputs)."""
    command = [sys.executable, str(BENCH / script), *options]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
