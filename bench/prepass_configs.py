"""Launch shapes of the SageSLA pre-pass kernels (issue 5), side by side on a CUDA GPU.

    python bench/prepass_configs.py

For each shape (DiT-like bf16 q, k, v, a random proj_l), timed in alternating rounds (do_bench, median):
* `partial_stats` (one read of k and v: k sums, |v| maxima and the linear branch's φ(K)ᵀV, Σφ(K) per span
  of the sequence) for every (tile, warps, programs per multiprocessor) choice, each followed by
  `finalize_stats` (reduction over the spans, KV' = KV·Wᵀ) with every rows-per-program count. Each result
  is compared with the first configuration's (largest relative difference over k̄, the V scale, KV' (bf16)
  and Σφ(K): the span count changes the fp32 summation order only).
* the q pass (pooling, INT8 q, the linear branch) and the k pass (smoothing, pooling, INT8 k) with each
  warp count (the warp count changes the fp32 summation order of the pooled means only).
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

from attention_inputs import dit_like_qkv, random_projection  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sage_prepass import (  # noqa: E402
    finalize_stats,
    partial_stats,
    pool_and_quantise,
    sage_prepass,
)

# (tile, warps, programs per multiprocessor): the first is the launch shape before 2026-11-21, None the
# current default (TOKENS_PER_STATS_PROGRAM tokens per program, whole waves).
PARTIAL = [(32, 8, 4), (16, 4, None)] + [(16, 4, waves) for waves in (2, 4, 8, 12, 16)]
FINAL_ROWS = (16, 8)
PASS_WARPS = (4, 8)


def flat(stats) -> list[torch.Tensor]:
    return [stats.k_mean, stats.v_scale, stats.linear.kv, stats.linear.z]


def largest_difference(a, b) -> float:
    """Largest |x − y| / max |y| over the paired tensors of a and b (lists, or SequenceStats)."""
    pairs = zip(a, b) if isinstance(a, list) else zip(flat(a), flat(b))
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item() for x, y in pairs)


def alternate(calls: dict, rounds: int = 3) -> dict:
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(do_bench(call, warmup=10, rep=100, return_mode="median"))
    return {name: statistics.median(t) for name, t in times.items()}


def stats_sweep(k: torch.Tensor, v: torch.Tensor, proj) -> None:
    def partial(config):
        tile, warps, waves = config
        return partial_stats(k, v, fp8_values=True, linear=True, tile=tile, num_warps=warps, waves=waves)

    reference = finalize_stats(partial(PARTIAL[0]), proj)
    print("  partial_stats (tile, warps, programs per SM) + finalize_stats (rows per program)")
    calls = {}
    for config in PARTIAL:
        for rows in FINAL_ROWS:
            calls[(config, rows)] = lambda c=config, r=rows: finalize_stats(partial(c), proj, r)
    times = alternate(calls)
    first = times[(PARTIAL[0], FINAL_ROWS[0])]
    for key in sorted(calls, key=times.get):
        diff = largest_difference(calls[key](), reference)
        config, rows = key
        speedup = first / times[key]
        print(f"    {config} rows {rows:2d}: {times[key]:7.3f} ms  {speedup:5.2f}x  max rel diff {diff:.1e}")


def pass_sweep(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj) -> None:
    recipe = R.HOPPER_RECIPE
    out = torch.empty_like(q)
    prep = sage_prepass(q, k, v, recipe, proj_l=proj, linear_out=out)

    def q_pass(warps: int, use_desc: bool | None = None):
        linear = prep.stats.linear
        return pool_and_quantise(
            q, recipe.blkq, quantise=True, linear=linear, linear_out=out, num_warps=warps, use_desc=use_desc
        )

    passes = {
        "q pass + linear": q_pass,
        "q pass + linear, KV' by pointer loads": lambda w: q_pass(w, use_desc=False),
        "k pass": lambda w: pool_and_quantise(
            k, recipe.blkk, mean=prep.stats.k_mean, quantise=True, num_warps=w
        ),
    }
    for name, run in passes.items():
        results = {w: [x.clone() for x in run(w) if x is not None] + [out.clone()] for w in PASS_WARPS}
        times = alternate({w: (lambda w=w, run=run: run(w)) for w in PASS_WARPS})
        for w in PASS_WARPS:
            diff = max(largest_difference([a], [b]) for a, b in zip(results[w], results[PASS_WARPS[0]]))
            print(
                f"  {name} {w:2d} warps: {times[w]:7.3f} ms  max rel diff vs {PASS_WARPS[0]} warps {diff:.1e}"
            )


def main() -> None:
    torch.set_grad_enabled(False)
    for shape, (heads, length) in SHAPES.items():
        q, k, v = dit_like_qkv(1, length, heads, 128, seed=3, device="cuda")
        proj = random_projection(128, seed=5, device="cuda")
        print(f"{shape}:")
        stats_sweep(k, v, proj)
        pass_sweep(q, k, v, proj)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
