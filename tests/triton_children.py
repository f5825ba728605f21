"""Running Triton checks in a child process, for the tests that judge what the child reports.

Triton decides when a kernel is decorated whether it is interpreted (TRITON_INTERPRET=1), and this test
process may already have imported the kernels compiled; a child also keeps the compiler's state out of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
INTERPRETER = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}


def run_interpreted_cases(cases_file: str) -> None:
    """Runs tests/<cases_file> in a child pytest under the interpreter; every case there must pass."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / cases_file)]
    env = {**os.environ, **INTERPRETER}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def json_report(script: str, env: dict[str, str] | None = None, timeout: int = 600) -> dict:
    """Runs tests/<script> as a child process (with `env` added to this one's) and returns the JSON object
    printed on its last line."""
    command = [sys.executable, str(TESTS / script)]
    child_env = {**os.environ, **env} if env is not None else None
    result = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def interpreted_kernels(module: str, runner: str) -> ModuleType:
    """Imports turbo_kernels.<module> in a cases file that `runner` collects under the interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", f"run through tests/{runner}"
    return import_module(f"comfyui_turbodiffusion.turbo_kernels.{module}")
