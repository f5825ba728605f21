"""Side-by-side timing of the SageSLA attention kernel against its version at an earlier commit (issue 5).

Run from the repository root on a CUDA GPU:

    python bench/attention_ab.py --baseline COMMIT|FILE [--shapes 1.3b-480p,14b-720p] [--topk 0.1]

The baseline's `turbo_kernels/sparse_attention.py` is read with `git show COMMIT:...` (or from FILE, e.g.
written beforehand into the git-ignored .ref/ for a device copy without the history) into a temporary file
and imported beside the current one (same package, so it uses today's pre-pass and selection). For each
shape: DiT-like bf16 q, k, v, one pre-pass and LUT shared by every variant; the sparse kernel (with the
accumulate epilogue, as the complete op runs it) of the baseline, of the current code and of the current
code with each optional `KernelConfig` flag, timed in alternating rounds (`triton.testing.do_bench`,
median, L2 flushed) so that clock drift hits all variants alike; and the complete `sagesla` op with the
current kernel and with the baseline kernel. Each variant's output is compared with the baseline's
(rel-L2) and with a second run of itself (bitwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _checkout import ROOT, alias_checkout_as_package
from _environment import environment_line
from kernel_ablations import ABLATIONS, ablated_source
from triton.testing import do_bench

alias_checkout_as_package()
sys.path.insert(0, str(ROOT / "tests"))

from attention_inputs import dit_like_qkv, random_projection  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sla_triton  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels import sparse_attention as current  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.block_select import select_blocks  # noqa: E402
from comfyui_turbodiffusion.turbo_kernels.sage_prepass import sage_prepass  # noqa: E402

# Issue 5's shapes (also used by the other attention benches): heads, tokens; B = 1, D = 128.
SHAPES = {"1.3b-480p": (12, 32760), "14b-720p": (40, 75600)}
KERNEL_FILE = "turbo_kernels/sparse_attention.py"
ROUNDS = 3


def load_baseline(baseline: str, folder: Path):
    """The attention kernel module as it was at commit `baseline` (or as in the file `baseline`, for a
    checkout without that history), imported from a temporary file."""
    if Path(baseline).is_file():
        source = Path(baseline).read_text()
    else:
        command = ["git", "show", f"{baseline}:{KERNEL_FILE}"]
        source = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return import_kernel_source(source, folder, "baseline")


def import_kernel_source(source: str, folder: Path, label: str):
    """A kernel module imported from `source`, beside the current one (same package)."""
    path = folder / f"sparse_attention_{label}.py"
    path.write_text(source)
    name = f"{current.__package__}.sparse_attention_{label}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def optional_flags() -> list[str]:
    """The boolean fields of the current KernelConfig beyond the launch shape."""
    return [f.name for f in dataclasses.fields(current.KernelConfig) if f.type in (bool, "bool")]


DEFAULT_COMBINATIONS = ("row_sum_mma", "row_sum_mma+num_stages=3", "none")


def config_with(base, combination: str):
    """`base` with exactly the optional flags named in `combination` ("a+b", or "none") set, and any
    "field=integer" item (e.g. "num_stages=3") assigned."""
    items = [] if combination == "none" else combination.split("+")
    assigned = dict(item.split("=", 1) for item in items if "=" in item)
    named = {item for item in items if "=" not in item}
    fields = {f.name for f in dataclasses.fields(current.KernelConfig)}
    unknown = (named - set(optional_flags())) | (set(assigned) - fields)
    if unknown:
        raise SystemExit(f"unknown KernelConfig fields {sorted(unknown)}; known: {sorted(fields)}")
    not_integers = sorted(f"{name}={value}" for name, value in assigned.items() if not value.isdigit())
    if not_integers:
        raise SystemExit(f"{not_integers}: a field=value item needs a non-negative integer value")
    flags = {flag: flag in named for flag in optional_flags()}
    return dataclasses.replace(base, **flags, **{name: int(value) for name, value in assigned.items()})


def compiled_kernels(kernel) -> dict:
    """{cache key: compiled kernel} of a JIT function on every device (Triton internals; best effort)."""
    found = {}
    for caches in getattr(kernel, "device_caches", {}).values():
        cache = caches[0] if isinstance(caches, tuple) else caches
        found.update(cache)
    return found


def resources(compiled) -> str:
    regs = getattr(compiled, "n_regs", "?")
    spills = getattr(compiled, "n_spills", "?")
    shared = getattr(getattr(compiled, "metadata", None), "shared", "?")
    return f"{regs} regs, {spills} spills, {shared} B shared"


def run_shape(
    shape: str, topk: float, baseline, recipe: R.SageRecipe, combinations: list[str], ablated: dict
) -> None:
    heads, length = SHAPES[shape]
    q, k, v = dit_like_qkv(1, length, heads, 128, seed=3, device="cuda")  # as bench/attention.py
    proj = random_projection(128, seed=5, device="cuda")
    out = torch.empty_like(q)
    prep = sage_prepass(q, k, v, recipe, proj_l=proj, linear_out=out)
    k_sel = R.selected_block_count(prep.pooled_k.shape[1], topk)
    lut, counts = select_blocks(prep.pooled_q, prep.pooled_k, k_sel)
    linear = out.clone()  # the linear branch, which the kernel accumulates onto
    base_config = current.default_config(q.device)

    def kernel(module, config):
        def call():
            out.copy_(linear)
            return module.quantised_attention(
                prep,
                v,
                out,
                recipe.blkq,
                recipe.blkk,
                lut=lut,
                counts=counts,
                accumulate=True,
                config=config,
            )

        return call

    variants = {"baseline kernel": kernel(baseline, baseline.default_config(q.device))}
    for combination in combinations:
        variants[f"current: {combination}"] = kernel(current, config_with(base_config, combination))
    modules = {"baseline kernel": baseline}
    for name, module in ablated.items():
        variants[f"ablation: {name}"] = kernel(module, base_config)
        modules[f"ablation: {name}"] = module
    copy_only = lambda: out.copy_(linear)  # noqa: E731  subtracted from every kernel time

    outputs = {}
    for name, fn in variants.items():
        module = modules.get(name, current)
        known = set(compiled_kernels(module._sparse_attention_kernel))
        first = fn().clone()
        second = fn().clone()
        outputs[name] = (first, torch.equal(first, second))
        new = [c for key, c in compiled_kernels(module._sparse_attention_kernel).items() if key not in known]
        if new:
            print(f"  compiled {name}: {resources(new[-1])}")
    times = {name: [] for name in [*variants, "copy of the output tile"]}
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            times[name].append(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        times["copy of the output tile"].append(do_bench(copy_only, warmup=25, rep=200, return_mode="median"))
    copy_ms = statistics.median(times["copy of the output tile"])
    base_ms = statistics.median(times["baseline kernel"]) - copy_ms
    reference = outputs["baseline kernel"][0]
    real_flop = 4.0 * 128 * recipe.blkq * recipe.blkk * heads * math.ceil(length / recipe.blkq) * k_sel
    print(
        f"\n{shape} top-k {topk} (k_sel {k_sel}): sparse kernel + accumulate, minus the {copy_ms:.3f} ms copy"
    )
    header = f"{'ms':>8s} {'real TOPS':>10s} {'vs baseline':>12s} {'rel-L2 vs base':>15s} bitwise"
    print(f"  {'variant':42s} {header}")
    for name in variants:
        ms = statistics.median(times[name]) - copy_ms
        spread = max(times[name]) - min(times[name])
        result, stable = outputs[name]
        print(
            f"  {name:42s} {ms:8.3f} {real_flop / ms / 1e9:10.1f} {base_ms / ms:11.3f}x "
            f"{rel_l2(result, reference):15.5f} {stable}   (spread of rounds {spread:.3f} ms)"
        )

    def complete(module):
        def call():
            original = sla_triton.quantised_attention
            sla_triton.quantised_attention = module.quantised_attention
            try:
                return sla_triton.sagesla_attention_triton(q, k, v, proj, topk, recipe)
            finally:
                sla_triton.quantised_attention = original

        return call

    whole = {
        "complete sagesla, baseline kernel": complete(baseline),
        "complete sagesla, current": complete(current),
    }
    whole_times = {name: [] for name in whole}
    for _ in range(ROUNDS):
        for name, fn in whole.items():
            whole_times[name].append(do_bench(fn, warmup=10, rep=200, return_mode="median"))
    base_whole = statistics.median(whole_times["complete sagesla, baseline kernel"])
    for name in whole:
        ms = statistics.median(whole_times[name])
        print(f"  {name:42s} {ms:8.3f} ms {base_whole / ms:8.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", required=True, help="commit whose sparse_attention.py is the baseline, or that file"
    )
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--topk", default="0.1")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_COMBINATIONS),
        help="comma-separated KernelConfig combinations of the current kernel (flag+flag+field=int, or none)",
    )
    parser.add_argument(
        "--ablations",
        default="",
        help=f"comma-separated timing-only ablations of the current kernel: {', '.join(ABLATIONS)}",
    )
    args = parser.parse_args()
    print(environment_line(torch.device("cuda")))
    commit = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=ROOT, capture_output=True, text=True)
    print(f"code at {commit.stdout.strip()}, baseline kernel from {args.baseline}")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        baseline = load_baseline(args.baseline, Path(folder))
        source = (ROOT / KERNEL_FILE).read_text()
        ablated = {
            name: import_kernel_source(ablated_source(source, name), Path(folder), f"ablation_{name}")
            for name in filter(None, args.ablations.split(","))
        }
        for shape in args.shapes.split(","):
            for topk in (float(t) for t in args.topk.split(",")):
                run_shape(shape, topk, baseline, R.HOPPER_RECIPE, args.configs.split(","), ablated)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
