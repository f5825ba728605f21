"""Side-by-side timing of the SageSLA pre-pass launch choices (`sage_prepass.PrepassConfig`, issue 5).

Run from the repository root on a CUDA GPU:

    python bench/prepass_ab.py [--shapes 1.3b-480p,14b-720p] [--topk 0.1]

For each shape (DiT-like bf16 q, k, v as bench/attention.py): every configuration's operands are compared
with the default configuration's (INT8/FP8 codes and scales bitwise, pooled means and the linear branch by
their largest difference), then the parts (q pass with and without the linear branch, the linear branch on
its own per tile shape, the k pass, the FP8 V pass, the fused keys + values pass, streamed q/k passes), the
whole pre-pass and the complete `sagesla` op are timed per configuration in alternating rounds
(`triton.testing.do_bench`, median, L2 flushed) so that clock drift hits all of them alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys

import torch
from _checkout import ROOT, alias_checkout_as_package
from _environment import environment_line
from triton.testing import do_bench

alias_checkout_as_package()
sys.path.insert(0, str(ROOT / "tests"))

from attention_inputs import dit_like_qkv, random_projection  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sage_prepass as P  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sla_triton import sagesla_attention_triton  # noqa: E402

SHAPES = {"1.3b-480p": (12, 32760), "14b-720p": (40, 75600)}  # heads, tokens; B = 1, D = 128
ROUNDS = 3
CONFIGS = {
    "default": P.PrepassConfig(),
    "before 64 w4": P.PrepassConfig(linear_placement="before"),
    "before 128 w8": P.PrepassConfig(linear_placement="before", linear_rows=128, linear_warps=8),
    "after 64 w4": P.PrepassConfig(linear_placement="after"),
    "after 128 w8": P.PrepassConfig(linear_placement="after", linear_rows=128, linear_warps=8),
    "fuse kv": P.PrepassConfig(fuse_keys_values=True),
    "after 128 w8 + fuse kv": P.PrepassConfig(
        linear_placement="after", linear_rows=128, linear_warps=8, fuse_keys_values=True
    ),
    "before 128 w8 + fuse kv": P.PrepassConfig(
        linear_placement="before", linear_rows=128, linear_warps=8, fuse_keys_values=True
    ),
    "after 128 w8 + stream 2": P.PrepassConfig(
        linear_placement="after", linear_rows=128, linear_warps=8, stream_programs_per_sm=2
    ),
    "after 128 w8 + stream 1 + fuse kv": P.PrepassConfig(
        linear_placement="after",
        linear_rows=128,
        linear_warps=8,
        stream_programs_per_sm=1,
        fuse_keys_values=True,
    ),
}
FIELDS = ("q8", "q_scale", "k8", "k_scale", "v_fp8", "v_scale")


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def compare(configs: dict, q, k, v, proj, recipe, topk) -> None:
    reference_out = torch.empty_like(q)
    reference = P.sage_prepass(q, k, v, recipe, proj_l=proj, linear_out=reference_out)
    reference_op = sagesla_attention_triton(q, k, v, proj, topk, recipe).float()
    for name, config in configs.items():
        out = torch.full_like(q, float("nan"))
        prep = P.sage_prepass(q, k, v, recipe, proj_l=proj, linear_out=out, config=config)
        exact = all(torch.equal(getattr(prep, f), getattr(reference, f)) for f in FIELDS)
        pooled = max(
            largest_difference(prep.pooled_q, reference.pooled_q),
            largest_difference(prep.pooled_k, reference.pooled_k),
        )
        linear = "(written after attention)"
        if config.linear_placement != "after":
            linear = f"{largest_difference(out, reference_out):.2e}, unwritten {int(out.isnan().sum())}"
        op = sagesla_attention_triton(q, k, v, proj, topk, recipe, prepass=config).float()
        rel = ((op - reference_op).norm() / reference_op.norm()).item()
        print(
            f"  {name:36s} codes+scales bitwise {exact}, pooled max diff {pooled:.2e}, linear branch max "
            f"diff {linear}; complete op rel-L2 vs default {rel:.2e}, finite {bool(op.isfinite().all())}"
        )


def timed_rounds(variants: dict, rep: int) -> dict:
    times = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            times[name].append(do_bench(fn, warmup=10, rep=rep, return_mode="median"))
    return {name: statistics.median(t) for name, t in times.items()}


def part_variants(q, k, v, proj, recipe) -> dict:
    out = torch.empty_like(q)
    stats = P.sequence_stats(k, v, fp8_values=True, proj_l=proj)
    scale_mul = R.LOG2E / math.sqrt(q.shape[-1])
    parts = {
        "stats + finalize": lambda: P.sequence_stats(k, v, fp8_values=True, proj_l=proj),
        "q pass + linear branch (shipped)": lambda: P.pool_and_quantise(
            q, recipe.blkq, quantise=True, scale_mul=scale_mul, linear=stats.linear, linear_out=out
        ),
        "q pass alone": lambda: P.pool_and_quantise(q, recipe.blkq, quantise=True, scale_mul=scale_mul),
        "k pass": lambda: P.pool_and_quantise(k, recipe.blkk, mean=stats.k_mean, quantise=True),
        "v fp8 pass": lambda: P.quantise_values_fp8(v, stats.v_scale),
        "keys + values fused": lambda: P.quantise_keys_values(k, v, stats.k_mean, stats.v_scale, recipe.blkk),
    }
    for rows, warps in ((32, 4), (64, 4), (64, 8), (128, 8)):
        parts[f"linear branch alone {rows} w{warps}"] = lambda r=rows, w=warps: P.linear_branch(
            q, stats.linear, out, rows=r, num_warps=w
        )
    for programs in (1, 2, 3):
        parts[f"q pass stream {programs}/SM"] = lambda p=programs: P.pool_and_quantise(
            q, recipe.blkq, quantise=True, scale_mul=scale_mul, stream_programs_per_sm=p
        )
        parts[f"k pass stream {programs}/SM"] = lambda p=programs: P.pool_and_quantise(
            k, recipe.blkk, mean=stats.k_mean, quantise=True, stream_programs_per_sm=p
        )
    return parts


def run_shape(shape: str, topk: float, recipe: R.SageRecipe) -> None:
    heads, length = SHAPES[shape]
    q, k, v = dit_like_qkv(1, length, heads, 128, seed=3, device="cuda")  # as bench/attention.py
    proj = random_projection(128, seed=5, device="cuda")
    rep = 100 if length < 50000 else 300
    print(f"\n{shape} (H {heads}, L {length}): operands of each configuration vs the default")
    compare(CONFIGS, q, k, v, proj, recipe, topk)
    print(f"{shape}: parts, ms (median of {ROUNDS} alternating rounds)")
    for name, ms in timed_rounds(part_variants(q, k, v, proj, recipe), rep).items():
        print(f"  {name:44s} {ms:8.4f}")
    prepass = {
        name: (
            lambda c=config: P.sage_prepass(
                q, k, v, recipe, proj_l=proj, linear_out=q.new_empty(q.shape), config=c
            )
        )
        for name, config in CONFIGS.items()
    }
    complete = {
        name: (lambda c=config: sagesla_attention_triton(q, k, v, proj, topk, recipe, prepass=c))
        for name, config in CONFIGS.items()
    }
    prepass_ms = timed_rounds(prepass, rep)
    complete_ms = timed_rounds(complete, rep)
    print(f"{shape}: whole pre-pass and complete sagesla top-k {topk}, ms")
    base_pre, base_all = prepass_ms["default"], complete_ms["default"]
    for name in CONFIGS:
        print(
            f"  {name:36s} pre-pass {prepass_ms[name]:8.4f} ({base_pre / prepass_ms[name]:.3f}x)   "
            f"complete {complete_ms[name]:8.4f} ({base_all / complete_ms[name]:.3f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--topk", type=float, default=0.1)
    args = parser.parse_args()
    print(environment_line(torch.device("cuda")))
    commit = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=ROOT, capture_output=True, text=True)
    print(f"code at {commit.stdout.strip()} (+ working tree)")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    for shape in args.shapes.split(","):
        run_shape(shape, args.topk, R.HOPPER_RECIPE)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
