"""Launches the SageSLA attention kernel for Nsight Compute (issue 5): at one shape, DiT-like inputs, top-k
0.1, the shipped kernel and each named timing-only ablation (`kernel_ablations.py`) once to compile, then
once each to be profiled. Profile only the second round, e.g. with two variants:

    ncu --clock-control none -k regex:_sparse_attention_kernel --launch-skip 2 --launch-count 2 \\
        --section WarpStateStats --section ComputeWorkloadAnalysis \\
        python bench/attention_ncu.py --ablations hoisted_loads

Prints the order of the profiled launches. With --complete it runs the whole `sagesla` op (pre-pass,
selection, kernel) twice instead, the second time inside the NVTX range "profiled":

    ncu --clock-control none --nvtx --nvtx-include "profiled/" --metrics gpu__time_duration.sum,... \
        python bench/attention_ncu.py --complete
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _checkout import ROOT, alias_checkout_as_package
from attention_ab import KERNEL_FILE, SHAPES, import_kernel_source
from kernel_ablations import ablated_source

alias_checkout_as_package()
sys.path.insert(0, str(ROOT / "tests"))

from attention_inputs import dit_like_qkv, random_projection  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sparse_attention as current  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.block_select import select_blocks  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sage_prepass import sage_prepass  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sla_triton import sagesla_attention_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="1.3b-480p", choices=sorted(SHAPES))
    parser.add_argument("--ablations", default="")
    parser.add_argument("--complete", action="store_true", help="the whole sagesla op (see above)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    heads, length = SHAPES[args.shape]
    recipe = R.HOPPER_RECIPE
    q, k, v = dit_like_qkv(1, length, heads, 128, seed=3, device="cuda")
    if args.complete:
        proj = random_projection(128, seed=5, device="cuda")
        sagesla_attention_triton(q, k, v, proj, 0.1, recipe)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profiled")
        sagesla_attention_triton(q, k, v, proj, 0.1, recipe)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        return
    out = torch.empty_like(q)
    prep = sage_prepass(q, k, v, recipe, proj_l=random_projection(128, seed=5, device="cuda"), linear_out=out)
    lut, counts = select_blocks(
        prep.pooled_q, prep.pooled_k, R.selected_block_count(prep.pooled_k.shape[1], 0.1)
    )
    with tempfile.TemporaryDirectory() as folder:
        source = (ROOT / KERNEL_FILE).read_text()
        modules = {"shipped": current}
        for name in filter(None, args.ablations.split(",")):
            modules[name] = import_kernel_source(
                ablated_source(source, name), Path(folder), f"ablation_{name}"
            )
        for _ in range(2):
            for module in modules.values():
                module.quantised_attention(
                    prep, v, out, recipe.blkq, recipe.blkk, lut=lut, counts=counts, accumulate=True
                )
            torch.cuda.synchronize()
    print("profiled launches, in order:", ", ".join(modules))


if __name__ == "__main__":
    main()
