"""Launch shapes of the block-selection top-k kernel (issue 5), side by side on a CUDA GPU.

    python bench/topk_configs.py

For each shape: DiT-like inputs through the pre-pass and the block-score GEMM once, then `top_k_lut` with
every (rows per program, warps) pair, timed in alternating rounds (do_bench, median); every LUT must equal
the one of the first configuration (the default until 2026-11-21, 8 rows x 8 warps; now 1 x 1).
"""

from __future__ import annotations

import statistics
import sys

import torch
from _checkout import ROOT, alias_checkout_as_package
from attention_ab import SHAPES  # issue 5's two shapes
from triton.testing import do_bench

alias_checkout_as_package()
sys.path.insert(0, str(ROOT / "tests"))

from attention_inputs import dit_like_qkv  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.block_select import block_scores, top_k_lut  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sage_prepass import sage_prepass  # noqa: E402

CONFIGS = [(8, 8), (1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (2, 2)]  # (rows per program, warps)


def time_configs(scores: torch.Tensor, k_sel: int, num_q: int) -> None:
    def call(config):
        return top_k_lut(scores, k_sel, num_q, rows=config[0], num_warps=config[1])[0]

    first = call(CONFIGS[0])
    equal = {c: torch.equal(call(c), first) for c in CONFIGS}
    times = {c: [] for c in CONFIGS}
    for _ in range(3):
        for c in CONFIGS:
            times[c].append(do_bench(lambda c=c: call(c), warmup=10, rep=100, return_mode="median"))
    base = statistics.median(times[CONFIGS[0]])
    for c in CONFIGS:
        ms = statistics.median(times[c])
        print(f"  rows {c[0]} warps {c[1]}: {ms:7.3f} ms  {base / ms:6.2f}x  same LUT {equal[c]}")


def main() -> None:
    torch.set_grad_enabled(False)
    for shape, (heads, length) in SHAPES.items():
        q, k, v = dit_like_qkv(1, length, heads, 128, seed=3, device="cuda")
        prep = sage_prepass(q, k, v, R.HOPPER_RECIPE)
        scores = block_scores(prep.pooled_q, prep.pooled_k)
        for topk in (0.1, 0.15):
            k_sel = R.selected_block_count(prep.pooled_k.shape[1], topk)
            print(f"{shape} top-k {topk} (k_sel {k_sel}, padded {scores.shape[-1]}):")
            time_configs(scores, k_sel, prep.pooled_q.shape[1])


if __name__ == "__main__":
    main()
