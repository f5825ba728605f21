"""bench/ceilings.py (issues 5 and 8) times exactly the token-side linear layers of a Wan DiT block: their
FLOPs per forward equal KERNELS.md §3's formulas (self-attention projections 8·L·C², cross-attention q/o
4·L·C², FFN 4·L·C·F per block), which the loop-time bounds in bench/RESULTS.md are built on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def ceilings():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("ceilings_bench", BENCH / "ceilings.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize(
    ("model", "table_tflop"),
    [("1.3B 480p", 82.1), ("14B 720p", 1809.6)],  # KERNELS.md §3, "linear / forward"
)
def test_linear_flops_per_forward_follow_the_spec(ceilings, model, table_tflop):
    tokens, width, ffn, layers = ceilings.MODELS[model]
    linears = ceilings.block_linears(width, ffn)
    assert len(linears) == 8
    flop = layers * sum(2 * tokens * k * n for _, k, n in linears)
    formula = layers * (8 * tokens * width**2 + 4 * tokens * width**2 + 4 * tokens * width * ffn)
    assert flop == formula
    # The table also counts the 512-token text k/v projections, which the bench leaves out (once per job).
    assert flop / 1e12 == pytest.approx(table_tflop, rel=0.01)
