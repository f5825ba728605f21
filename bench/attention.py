"""GPU benchmark and correctness check of the SLA / SageSLA Triton attention (issue 5, KERNELS.md §5).

Run from the repository root on a CUDA GPU:

    python bench/attention.py [--shapes 1.3b-480p,14b-720p] [--topk 0.1,0.15] [--json results.json]

1. Correctness at real length (L = 32760, B·H = 2, bf16, random and DiT-like inputs) against the float64
   formulas of tests/attention_formulas.py: block selection vs a float64 top-k (near-ties aside), sparse
   branch vs exact block-sparse attention with the same LUT, full op (sparse + linear branch + proj_l),
   dense Sage vs dense attention; outputs poisoned with NaN first, two runs bitwise identical; odd lengths;
   top-k 0.
2. Timing (`triton.testing.do_bench`, median, L2 flushed) of the complete ops and their parts, with the
   baselines measured in the same run: torch SDPA (cuDNN, flash), `sageattention==1.0.6` and TurboDiffusion's
   `SparseLinearAttention` (bf16 SLA) when importable. `.ref/turbo_sla` (a copy of thu-ml/TurboDiffusion
   turbodiffusion/SLA/, never committed) is put on the path if present.
Effective TOPS = 4·B·H·L²·D / t; real TOPS = 4·D·BLKQ·BLKK·(selected blocks) / t.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
from _checkout import ROOT, alias_checkout_as_package
from triton.testing import do_bench

alias_checkout_as_package()
sys.path.insert(0, str(ROOT / "tests"))
if (ROOT / ".ref").is_dir():
    sys.path.insert(0, str(ROOT / ".ref"))

import attention_formulas as F  # noqa: E402
from attention_inputs import dit_like_qkv, random_projection, random_qkv  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.block_select import block_scores, select_blocks, top_k_lut  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sage_prepass import (  # noqa: E402
    finalize_stats,
    partial_stats,
    pool_and_quantise,
    quantise_values_fp8,
    sage_prepass,
    sequence_stats,
)
from comfyui_turbodiffusion.turbo_kernels.sla_triton import (  # noqa: E402
    sage_dense_attention_triton,
    sagesla_attention_triton,
    sla_attention_triton,
)
from comfyui_turbodiffusion.turbo_kernels.sparse_attention import (  # noqa: E402
    KernelConfig,
    _sparse_attention_kernel,
    bf16_sparse_attention,
    quantised_attention,
)

SHAPES = {  # name: (heads, tokens), B = 1, D = 128
    "1.3b-480p": (12, 32760),
    "1.3b-720p": (12, 75600),
    "14b-480p": (40, 32760),
    "14b-720p": (40, 75600),
}
DEVICE = "cuda"
LOG: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LOG.append(line)


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    try:
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,memory.total"
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        env["nvidia_smi"] = "unavailable"
    return env


# ----------------------------------------------------------------------------------------------- correctness


def check(results: dict, name: str, value: float, bound: float, *, upper: bool = True) -> None:
    ok = value <= bound if upper else value >= bound
    results[name] = {"value": value, "bound": bound, "ok": bool(ok)}
    say(f"  {'PASS' if ok else 'FAIL'} {name}: {value:.5g} ({'<=' if upper else '>='} {bound})")


def full_reference(q, k, v, lut, blkq, blkk, proj):
    mask = F.mask_from_lut(lut, q.shape[0], math.ceil(q.shape[1] / blkk))
    out = F.masked_attention(q, k, v, mask, blkq, blkk)
    if proj is not None:
        out = out + F.linear_branch(q, k, v, proj.weight, proj.bias)
    return out


def correctness(
    recipe: R.SageRecipe, results: dict, length: int = 32760, odd_lengths=(127, 129, 1000, 4097), dev="cuda"
) -> None:
    d = 128
    proj = random_projection(d, seed=7, device=dev)
    for kind, make in (("random", random_qkv), ("dit", dit_like_qkv)):
        q, k, v = make(1, length, 2, d, seed=11, device=dev)
        say(f"[check] L={length} B*H=2 inputs={kind}")
        for topk in (0.1, 0.15):
            prep = sage_prepass(q, k, v, recipe)
            k_sel = R.selected_block_count(prep.pooled_k.shape[1], topk)
            lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
            scores = F.block_scores(q, k, recipe.blkq, recipe.blkk)
            check(
                results, f"{kind}/{topk}/sagesla selection mismatches", F.selection_mismatches(lut, scores), 0
            )
            if k_sel == 0:
                say(f"  (top-k {topk} selects no block at L={length}: sparse checks skipped)")
                continue
            out = torch.full_like(q, float("nan"))
            quantised_attention(prep, v, out, recipe.blkq, recipe.blkk, lut=lut, counts=counts)
            check(results, f"{kind}/{topk}/sagesla sparse all written", float((~out.isfinite()).sum()), 0)
            again = torch.full_like(q, float("nan"))
            quantised_attention(prep, v, again, recipe.blkq, recipe.blkk, lut=lut, counts=counts)
            check(results, f"{kind}/{topk}/sagesla sparse bitwise rerun", float((out != again).sum()), 0)
            ref = full_reference(q, k, v, lut, recipe.blkq, recipe.blkk, None)
            bound = 0.05 if recipe.pv_dtype == "fp8" else 0.04
            check(results, f"{kind}/{topk}/sagesla sparse rel-L2 vs fp64", F.rel_l2(out, ref), bound)
            check(
                results, f"{kind}/{topk}/sagesla sparse cos vs fp64", F.cosine(out, ref), 0.9985, upper=False
            )
            qh, kh, vh = (R.heads_first(x) for x in (q, k, v))
            emulated = R.tokens_first(R.sage_sparse_attention(qh, kh, vh, lut, counts, recipe), 1)
            check(results, f"{kind}/{topk}/sagesla sparse rel-L2 vs emulation", F.rel_l2(out, emulated), 0.02)
            emu_error = F.rel_l2(emulated, ref)
            check(
                results,
                f"{kind}/{topk}/sagesla sparse error / emulation error",
                F.rel_l2(out, ref) / emu_error,
                1.15,
            )

            full = sagesla_attention_triton(q, k, v, proj, topk, recipe)
            ref = full_reference(q, k, v, lut, recipe.blkq, recipe.blkk, proj)
            check(results, f"{kind}/{topk}/sagesla full rel-L2 vs fp64", F.rel_l2(full, ref), 0.05)

            blkq, blkk = R.SLA_BLOCKS
            pooled_q, _, _ = pool_and_quantise(q, blkq)
            stats = sequence_stats(k, v, fp8_values=False, proj_l=None)
            pooled_k, _, _ = pool_and_quantise(k, blkk, mean=stats.k_mean)
            sla_lut, sla_counts = select_blocks(
                pooled_q, pooled_k, R.selected_block_count(pooled_k.shape[1], topk)
            )
            scores = F.block_scores(q, k, blkq, blkk)
            check(
                results, f"{kind}/{topk}/sla selection mismatches", F.selection_mismatches(sla_lut, scores), 0
            )
            sparse = torch.full_like(q, float("nan"))
            bf16_sparse_attention(q, k, v, sla_lut, sla_counts, blkq, blkk, out=sparse)
            ref = full_reference(q, k, v, sla_lut, blkq, blkk, None)
            check(results, f"{kind}/{topk}/sla sparse all written", float((~sparse.isfinite()).sum()), 0)
            check(results, f"{kind}/{topk}/sla sparse rel-L2 vs fp64", F.rel_l2(sparse, ref), 5e-3)
            full = sla_attention_triton(q, k, v, proj, topk)
            ref = full_reference(q, k, v, sla_lut, blkq, blkk, proj)
            # Two bf16 roundings (linear branch, then the sum), as in TurboDiffusion: bound 1e-2.
            check(results, f"{kind}/{topk}/sla full rel-L2 vs fp64", F.rel_l2(full, ref), 1e-2)
        dense = sage_dense_attention_triton(q, k, v, recipe)
        ref = F.masked_attention(q, k, v, None, 1, 1)
        bound = 0.05 if recipe.pv_dtype == "fp8" else 0.04
        check(results, f"{kind}/sage dense rel-L2 vs fp64", F.rel_l2(dense, ref), bound)
        check(results, f"{kind}/sage dense cos vs fp64", F.cosine(dense, ref), 0.9985, upper=False)

    say("[check] odd lengths and top-k 0")
    for odd in odd_lengths:
        q, k, v = random_qkv(1, odd, 2, d, seed=odd, device=dev)
        for topk in (0.0, 0.5):
            out = sagesla_attention_triton(q, k, v, proj, topk, recipe)
            qh, kh = R.heads_first(q), R.heads_first(k)
            lut, _ = R.block_map(qh, kh, recipe.blkq, recipe.blkk, topk)
            ref = full_reference(q, k, v, lut, recipe.blkq, recipe.blkk, proj)
            check(results, f"L={odd}/topk={topk}/sagesla finite", float((~out.isfinite()).sum()), 0)
            check(results, f"L={odd}/topk={topk}/sagesla rel-L2", F.rel_l2(out, ref), 0.05)
            out = sla_attention_triton(q, k, v, proj, topk)
            lut, _ = R.block_map(qh, kh, *R.SLA_BLOCKS, topk)
            ref = full_reference(q, k, v, lut, *R.SLA_BLOCKS, proj)
            check(results, f"L={odd}/topk={topk}/sla rel-L2", F.rel_l2(out, ref), 1e-2)


def register_report() -> list[str]:
    """Registers / spills of each compiled variant of the attention kernel (Triton internals; best effort)."""
    lines = []
    try:
        for caches in _sparse_attention_kernel.device_caches.values():
            for kernel in caches[0].values():
                lines.append(
                    f"regs {kernel.n_regs} spills {kernel.n_spills} smem {kernel.metadata.shared} "
                    f"warps {kernel.metadata.num_warps} stages {kernel.metadata.num_stages} "
                    f"{getattr(getattr(kernel, 'src', None), 'constants', '')}"
                )
    except Exception as error:  # internals differ between Triton versions
        lines.append(f"register report unavailable: {error!r}")
    return lines


# ---------------------------------------------------------------------------------------------------- timing


def time_ms(fn, rep: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def reference_sla_module(topk: float, proj):
    try:
        from turbo_sla import SparseLinearAttention
    except ImportError:
        return None
    module = SparseLinearAttention(128, topk, BLKQ=R.SLA_BLOCKS[0], BLKK=R.SLA_BLOCKS[1]).to(DEVICE)
    with torch.no_grad():
        module.proj_l.weight.copy_(proj.weight)
        module.proj_l.bias.copy_(proj.bias)
    return module


def sageattention_v1():
    try:
        from sageattention import sageattn
    except ImportError:
        return None
    return sageattn


class Timer:
    """Times callables for one shape and records rows of ms / effective / real TOPS."""

    def __init__(self, shape: str, heads: int, length: int, rows: list):
        self.shape, self.heads, self.length, self.rows = shape, heads, length, rows
        self.dense_flop = 4.0 * heads * length * length * 128

    def __call__(self, label: str, fn, *, rep: int = 200, blocks: tuple[int, int] | None = None, topk=None):
        try:
            ms = time_ms(fn, rep=rep)
        except Exception as error:
            say(f"  {self.shape:10s} {label:58s} FAILED: {type(error).__name__}: {str(error)[:300]}")
            return
        eff = self.dense_flop / ms / 1e9
        real = eff
        if blocks is not None:
            blkq, blkk = blocks
            nkb = math.ceil(self.length / blkk)
            selected = self.heads * math.ceil(self.length / blkq) * R.selected_block_count(nkb, topk)
            real = 4.0 * 128 * blkq * blkk * selected / ms / 1e9
        self.rows.append({"shape": self.shape, "op": label, "ms": ms, "eff_tops": eff, "real_tops": real})
        say(f"  {self.shape:10s} {label:58s} {ms:9.3f} ms  eff {eff:8.1f}  real {real:7.1f} TOPS")


def bench_dense(timer: Timer, q, k, v, recipe: R.SageRecipe) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rep = 400 if timer.length < 50000 else 1500
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    for backend, label in (
        (SDPBackend.CUDNN_ATTENTION, "sdpa cudnn (dense bf16)"),
        (SDPBackend.FLASH_ATTENTION, "sdpa flash (dense bf16)"),
    ):

        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

        timer(label, sdpa, rep=rep)
    sageattn = sageattention_v1()
    if sageattn is None:
        say("  sageattention not importable: baseline skipped")
    else:
        timer(
            "sageattention 1.0.6 (dense int8/fp16)", lambda: sageattn(q, k, v, tensor_layout="NHD"), rep=rep
        )
    timer("ours sage dense (int8/fp8)", lambda: sage_dense_attention_triton(q, k, v, recipe), rep=rep)


def bench_sparse(
    timer: Timer, q, k, v, proj, topk: float, recipe: R.SageRecipe, configs: dict, variants: bool
) -> None:
    sla_blocks = R.SLA_BLOCKS
    sage_blocks = (recipe.blkq, recipe.blkk)
    module = reference_sla_module(topk, proj)
    if module is None:
        say("  TurboDiffusion SLA module not importable (.ref/turbo_sla): baseline skipped")
    else:
        label = f"TurboDiffusion SparseLinearAttention topk={topk}"
        timer(label, lambda: module(q, k, v), blocks=sla_blocks, topk=topk)
    timer(
        f"ours sla complete topk={topk}",
        lambda: sla_attention_triton(q, k, v, proj, topk),
        blocks=sla_blocks,
        topk=topk,
    )
    timer(
        f"ours sagesla complete topk={topk}",
        lambda: sagesla_attention_triton(q, k, v, proj, topk, recipe),
        blocks=sage_blocks,
        topk=topk,
    )

    out = torch.empty_like(q)
    prep = sage_prepass(q, k, v, recipe, proj_l=proj, linear_out=out)
    k_sel = R.selected_block_count(prep.pooled_k.shape[1], topk)
    lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
    fp8 = recipe.pv_dtype == "fp8"
    timer(f"part stats kernel topk={topk}", lambda: partial_stats(k, v, fp8_values=fp8, linear=True))
    if variants:  # the launch shape before 2026-11-21
        timer(
            f"part stats kernel tile 32 w8 x4 topk={topk}",
            lambda: partial_stats(k, v, fp8_values=fp8, linear=True, tile=32, num_warps=8, waves=4),
        )
    partial = partial_stats(k, v, fp8_values=fp8, linear=True)
    timer(f"part stats finalize (k mean, v scale, KV') topk={topk}", lambda: finalize_stats(partial, proj))
    timer(
        f"part pool + int8 q + linear branch topk={topk}",
        lambda: pool_and_quantise(
            q, recipe.blkq, quantise=True, linear=prep.stats.linear, linear_out=out, scale_mul=0.1
        ),
    )
    timer(f"part pool + int8 q topk={topk}", lambda: pool_and_quantise(q, recipe.blkq, quantise=True))
    timer(
        f"part smooth + pool + int8 k topk={topk}",
        lambda: pool_and_quantise(k, recipe.blkk, mean=prep.stats.k_mean, quantise=True),
    )
    if prep.v_scale is not None:
        timer(f"part fp8 v (transposed) topk={topk}", lambda: quantise_values_fp8(v, prep.v_scale))
    timer(
        f"part block select (k_sel {k_sel}) topk={topk}",
        lambda: select_blocks(prep.pooled_q, prep.pooled_k, k_sel),
    )
    timer(f"part block scores topk={topk}", lambda: block_scores(prep.pooled_q, prep.pooled_k))
    scores = block_scores(prep.pooled_q, prep.pooled_k)
    num_q = prep.pooled_q.shape[1]
    timer(f"part top-k -> LUT topk={topk}", lambda: top_k_lut(scores, k_sel, num_q))
    for name, (config, use_desc) in configs.items():
        for accumulate in (True, False):

            def kernel(config=config, use_desc=use_desc, accumulate=accumulate):
                return quantised_attention(
                    prep,
                    v,
                    out,
                    *sage_blocks,
                    lut=lut,
                    counts=counts,
                    accumulate=accumulate,
                    config=config,
                    use_desc=use_desc,
                )

            label = f"sparse kernel {name}{' + accumulate' if accumulate else ''} topk={topk}"
            timer(label, kernel, blocks=sage_blocks, topk=topk)

    stats = sequence_stats(k, v, fp8_values=False, proj_l=proj)
    pooled_q, _, _ = pool_and_quantise(q, sla_blocks[0], linear=stats.linear, linear_out=out)
    pooled_k, _, _ = pool_and_quantise(k, sla_blocks[1], mean=stats.k_mean)
    sla_lut, sla_counts = select_blocks(pooled_q, pooled_k, R.selected_block_count(pooled_k.shape[1], topk))
    sla_configs = (("128x64 w8 s3", KernelConfig(128, 8, 3)), ("64x64 w4 s2", KernelConfig(64, 4, 2)))
    for name, config in sla_configs[: 2 if variants else 1]:

        def sla_kernel(config=config):
            return bf16_sparse_attention(
                q, k, v, sla_lut, sla_counts, *sla_blocks, accumulate=True, config=config, out=out
            )

        timer(
            f"sla bf16 sparse kernel {name} + accumulate topk={topk}",
            sla_kernel,
            blocks=sla_blocks,
            topk=topk,
        )


def benchmark_shape(
    shape: str, topks: list[float], recipe: R.SageRecipe, rows: list, configs: dict, variants: bool
) -> None:
    heads, length = SHAPES[shape]
    timer = Timer(shape, heads, length, rows)
    say(
        f"[bench] {shape}: B=1 H={heads} L={length} D=128, dense {timer.dense_flop / 1e12:.2f} TFLOP per call"
    )
    q, k, v = dit_like_qkv(1, length, heads, 128, seed=3, device=DEVICE)
    proj = random_projection(128, seed=5, device=DEVICE)
    bench_dense(timer, q, k, v, recipe)
    for topk in topks:
        bench_sparse(timer, q, k, v, proj, topk, recipe, configs, variants)


def speedups(rows: list) -> list[str]:
    """Complete ops vs the baselines measured in the same run."""
    ms = {(r["shape"], r["op"]): r["ms"] for r in rows}
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        cudnn = ms.get((shape, "sdpa cudnn (dense bf16)"))
        for (row_shape, op), t in ms.items():
            if row_shape != shape or not op.startswith("ours s") or "complete" not in op:
                continue
            topk = op.rsplit("topk=", 1)[1]
            reference = ms.get((shape, f"TurboDiffusion SparseLinearAttention topk={topk}"))
            parts = [f"{shape} {op}: {t:.3f} ms"]
            if reference:
                parts.append(f"{reference / t:.2f}x the TurboDiffusion SLA module ({reference:.3f} ms)")
            if cudnn:
                parts.append(f"{cudnn / t:.2f}x cuDNN dense ({cudnn:.3f} ms)")
            lines.append(", ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="1.3b-480p,14b-720p")
    parser.add_argument("--topk", default="0.1,0.15")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-variants", action="store_true", help="time only the default kernel configs")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    env = environment()
    say(json.dumps(env))
    recipe = R.sage_recipe(torch.cuda.get_device_capability(0))
    say(f"recipe {recipe}")
    hopper = torch.cuda.get_device_capability(0)[0] == 9
    base = KernelConfig(64, 4, 2) if hopper else KernelConfig(128, 8, 3)
    configs = (
        {"default": (base, None), "ptr": (base, False)} if not args.no_variants else {"default": (base, None)}
    )
    results: dict = {}
    rows: list = []
    start = time.time()
    if not args.skip_checks:
        try:
            correctness(recipe, results)
        except Exception:
            say(traceback.format_exc())
        say(f"[check] done in {time.time() - start:.0f} s")
    if not args.skip_bench:
        for shape in args.shapes.split(","):
            try:
                benchmark_shape(
                    shape,
                    [float(t) for t in args.topk.split(",")],
                    recipe,
                    rows,
                    configs,
                    not args.no_variants,
                )
            except Exception:
                say(traceback.format_exc())
    for line in register_report():
        say(f"[kernel] {line}")
    for line in speedups(rows):
        say(f"[speed-up] {line}")
    failed = [k for k, r in results.items() if not r["ok"]]
    say(f"[summary] checks: {len(results) - len(failed)} passed, {len(failed)} failed {failed}")
    say(f"[summary] total {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"env": env, "checks": results, "timings": rows, "log": LOG}, indent=1)
        )


if __name__ == "__main__":
    main()
