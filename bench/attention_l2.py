"""Is the SageSLA sparse kernel bound by L2 -> shared-memory traffic on Hopper? A timing experiment (issue 5).

With the reference's Hopper block map (BLKQ 64, BLKK 128) each program multiplies 64 query rows against every
selected 128-key INT8 K / FP8 Vᵀ tile pair (32 KB for 4.2 M operations). 128-row programs would read half the
bytes per operation, but the LUT is per 64-row block. This script times, at the 1.3B-480p shape (H 12,
L 32760, D 128, DiT-like inputs, top-k 0.1), the sparse kernel alone on:

  a) the real Hopper map (BLKQ 64), 64-row programs (the shipped configuration);
  b) a BLKQ 128 map with the same number of selected key blocks, 128-row programs (8 warps; 2 and 3
     stages): half the L2 traffic per operation, same MMA work;
  c) the same BLKQ 128 map with 64-row programs: same traffic per operation as (a), to separate the effect of
     the LUT from that of the tile height.

(b) is a different selection granularity and is NOT a shippable configuration; it only tells whether moving
fewer bytes would pay. If (b) is much faster than (a) and (c) ≈ (a), the kernel is bandwidth-bound. Needs a
CUDA GPU with FP8 (sm89+); prints one table.

    python bench/attention_l2.py [--topk 0.1] [--length 32760] [--heads 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from _checkout import ROOT, alias_checkout_as_package
from triton.testing import do_bench

alias_checkout_as_package()
sys.path.insert(0, str(ROOT / "tests"))

from attention_inputs import dit_like_qkv, random_projection  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.block_select import select_blocks  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sage_prepass import sage_prepass  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sparse_attention import KernelConfig, quantised_attention  # noqa: E402


def prepared(q, k, v, proj, recipe: R.SageRecipe, topk: float):
    out = torch.empty_like(q)
    prep = sage_prepass(q, k, v, recipe, proj_l=proj, linear_out=out)
    k_sel = R.selected_block_count(prep.pooled_k.shape[1], topk)
    lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
    return prep, lut, counts, out, k_sel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    q, k, v = dit_like_qkv(1, args.length, args.heads, 128, seed=3, device="cuda")
    proj = random_projection(128, seed=5, device="cuda")
    hopper = R.HOPPER_RECIPE
    wide = dataclasses.replace(hopper, blkq=128)
    cases = (
        ("a) BLKQ 64 map, 64-row programs w4 s2 (shipped)", hopper, KernelConfig(64, 4, 2)),
        ("b) BLKQ 128 map, 128-row programs w8 s2", wide, KernelConfig(128, 8, 2)),
        ("b) BLKQ 128 map, 128-row programs w8 s3", wide, KernelConfig(128, 8, 3)),
        ("c) BLKQ 128 map, 64-row programs w4 s2", wide, KernelConfig(64, 4, 2)),
    )
    rows = []
    for label, recipe, config in cases:
        prep, lut, counts, out, k_sel = prepared(q, k, v, proj, recipe, args.topk)

        def kernel(prep=prep, lut=lut, counts=counts, out=out, recipe=recipe, config=config):
            return quantised_attention(
                prep, v, out, recipe.blkq, recipe.blkk, lut=lut, counts=counts, config=config, use_desc=True
            )

        try:
            kernel()
            torch.cuda.synchronize()
            ms = do_bench(kernel, warmup=25, rep=200, return_mode="median")
        except Exception as failure:  # a config that does not compile must not hide the others
            rows.append((label, k_sel, f"failed: {failure!r}"[:100]))
            continue
        real_ops = 4 * args.length**2 * 128 * args.heads * k_sel / prep.pooled_k.shape[1]
        tiles = args.heads * lut.shape[1] * k_sel * (128 // config.block_m if recipe.blkq == 128 else 1)
        traffic_gb = tiles * 2 * 128 * recipe.blkk / 1e9  # int8 K + fp8 Vᵀ per (program, key block)
        rows.append(
            (
                label,
                k_sel,
                f"{ms:.3f} ms  {real_ops / ms / 1e9:.0f} real TOPS  {traffic_gb / ms:.2f} TB/s K+V",
            )
        )
    for label, k_sel, result in rows:
        print(f"{label:52s} k_sel {k_sel:3d}  {result}", flush=True)


if __name__ == "__main__":
    main()
