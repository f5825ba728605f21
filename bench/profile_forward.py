"""Where one DiT forward spends its GPU time (issue 8): one warm-up and one profiled forward of a
random-weight Wan DiT, kernels summed by name and by category.

    python bench/profile_forward.py [--size 1.3b|14b] [--linear-quant none|int8|fp8]
        [--block-ops auto|torch] [--attention sagesla|sla|sdpa] [--top 25] [--trace PATH]
    python bench/profile_forward.py --dry-run   # a tiny model on the CPU: checks the script, measures nothing

Sizes: 1.3B at 480p × 81 frames (latent 21×60×104, 32760 tokens), 14B at 720p × 81 (latent 21×90×160, 75600
tokens); weights random as released (bench/_models.py), text context of 512 tokens, t = 900.
Prints the forward's wall time unprofiled and profiled, the top kernels by total CUDA time (CPU self time in
the dry run) and the sums per category: attention kernels, GEMMs, activation quantisers, norm / RoPE /
residual kernels, element-wise / casts (GELU, copies, conversions), other. `--trace` writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from _checkout import alias_checkout_as_package
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

alias_checkout_as_package()

from _models import random_weights, state_shapes  # noqa: E402
from comfyui_turbodiffusion.wan_models.block_ops import make_block_ops  # noqa: E402
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig  # noqa: E402
from comfyui_turbodiffusion.wan_models.dit_loader import dit_from_state_dict  # noqa: E402

SIZES = {
    "1.3b": dict(preset="wan2.1-t2v-1.3b", latent=(1, 16, 21, 60, 104), label="1.3B 480p x81"),
    "14b": dict(preset="wan2.1-t2v-14b", latent=(1, 16, 21, 90, 160), label="14B 720p x81"),
}
TINY = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, has_sla_proj=True)
TINY_LATENT = (1, 16, 2, 4, 6)
SLA_TOPK = 0.1
# Kernel (or, on the CPU, operator) names -> category; the first matching pattern wins.
CATEGORIES = (
    (
        "attention",
        r"attn|attention|fmha|flash|sdpa|_block_scores|_top_k|_stats_kernel|_finalize_stats|_pool_quantise"
        r"|_values_fp8|softmax",
    ),
    ("GEMM", r"gemm|matmul|scaled_mm|cutlass|xmma|nvjet|cublas|sm\d+_.*_tn|aten::(add)?mm\b|aten::bmm"),
    ("activation quantisers", r"quantize|quantise"),
    ("norm / RoPE / residual", r"layer_norm|rms_norm|gated_add|norm|rope"),
    (
        "element-wise / casts",
        r"elementwise|vectorized|unrolled|gelu|copy|cast|_to_copy|fill|silu|mul|add|cat",
    ),
)


@dataclass(frozen=True)
class KernelTime:
    name: str
    calls: int
    microseconds: float


def categorise(name: str) -> str:
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return "other"


def kernel_times(profiler, device: str) -> list[KernelTime]:
    """Per kernel name: calls and total time (CUDA kernels on a GPU, operators' CPU self time on the CPU)."""
    times = []
    for event in profiler.key_averages():
        if device == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            microseconds = event.device_time_total
        else:
            if event.device_type != DeviceType.CPU or not event.key.startswith("aten::"):
                continue
            microseconds = event.self_cpu_time_total
        if microseconds > 0:
            times.append(KernelTime(event.key, event.count, microseconds))
    return sorted(times, key=lambda kernel: kernel.microseconds, reverse=True)


def category_sums(times: list[KernelTime]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for kernel in times:
        sums[categorise(kernel.name)] += kernel.microseconds
    return dict(sums)


def build_model(args, device: str):
    config = (
        WanDiTConfig(**TINY)
        if args.dry_run
        else WanDiTConfig.from_name(SIZES[args.size]["preset"], has_sla_proj=True)
    )
    state = random_weights(state_shapes(config), device, seed=0)
    model = dit_from_state_dict(
        state,
        device=device,
        attention=args.attention,
        sla_topk=1.0 if args.dry_run else SLA_TOPK,  # tiny sequences: keep every block in the dry run
        linear_quant=args.linear_quant,
    )
    model.set_block_ops(make_block_ops(args.block_ops))
    return model, config


def inputs(config: WanDiTConfig, latent: tuple[int, ...], device: str):
    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(latent, generator=generator, device=device).to(torch.bfloat16)
    context = torch.zeros(latent[0], 512, config.text_dim, device=device)
    context[:, :24] = 0.3 * torch.randn(latent[0], 24, config.text_dim, generator=generator, device=device)
    return x, torch.full((latent[0],), 900.0, device=device), context.to(torch.bfloat16)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def report(times: list[KernelTime], top: int, wall: dict[str, float], blocks: int, device: str) -> list[str]:
    unit = "CUDA" if device == "cuda" else "CPU self"
    total = sum(kernel.microseconds for kernel in times)
    lines = [
        f"forward wall time: {wall['plain'] * 1e3:.1f} ms unprofiled, "
        f"{wall['profiled'] * 1e3:.1f} ms profiled;"
        f" {unit} time of all kernels {total / 1e3:.1f} ms ({total / 1e3 / blocks:.2f} ms per block)",
        "",
        f"| category | {unit} ms | per block ms | share |",
        "| --- | ---: | ---: | ---: |",
    ]
    sums = category_sums(times)
    for category in [name for name, _ in CATEGORIES] + ["other"]:
        value = sums.get(category, 0.0)
        lines.append(
            f"| {category} | {value / 1e3:.2f} | {value / 1e3 / blocks:.3f} "
            f"| {100 * value / max(total, 1):.1f} % |"
        )
    lines += [
        "",
        f"top {top} kernels by total {unit} time:",
        f"| kernel | category | calls | {unit} ms | share |",
    ]
    lines.append("| --- | --- | ---: | ---: | ---: |")
    for kernel in times[:top]:
        name = kernel.name if len(kernel.name) <= 90 else kernel.name[:87] + "..."
        share = 100 * kernel.microseconds / max(total, 1)
        lines.append(
            f"| {name} | {categorise(kernel.name)} | {kernel.calls} "
            f"| {kernel.microseconds / 1e3:.3f} | {share:.1f} % |"
        )
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="1.3b", choices=tuple(SIZES))
    parser.add_argument("--linear-quant", default="none", choices=("none", "int8", "fp8"))
    parser.add_argument("--block-ops", default="auto", choices=("auto", "torch"))
    parser.add_argument("--attention", default="sagesla", choices=("sagesla", "sla", "sdpa"))
    parser.add_argument("--top", type=int, default=25, help="how many kernels to list")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace of the profiled forward here")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/profile_forward.py needs a CUDA GPU (or --dry-run)")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    label = "tiny (dry run)" if args.dry_run else SIZES[args.size]["label"]
    options = f"linear {args.linear_quant}, block ops {args.block_ops}, attention {args.attention}"
    lines = [f"bench/profile_forward.py on {name}, torch {torch.__version__}: {label}, {options}"]
    print(lines[0], flush=True)

    model, config = build_model(args, device)
    x, t, context = inputs(config, TINY_LATENT if args.dry_run else SIZES[args.size]["latent"], device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad():
        model(x, t, context)  # warm-up: kernel compilation, self-checks, RoPE tables
        wall = {"plain": timed(lambda: model(x, t, context), device)}
        with profile(activities=activities) as profiler:
            wall["profiled"] = timed(lambda: model(x, t, context), device)
    if args.trace:
        profiler.export_chrome_trace(str(args.trace))
    lines += report(kernel_times(profiler, device), args.top, wall, config.num_layers, device)
    print("\n".join(lines[1:]), flush=True)
    return lines


if __name__ == "__main__":
    main()
