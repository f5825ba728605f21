"""GPU benchmark of the Wan 2.1 VAE (issue 7): our decode and encode against diffusers' `AutoencoderKLWan`,
in one run, with the same random weights (real Wan2.1 config, bf16).

Run from the repository root on a CUDA GPU (diffusers must be importable; on the lent GPU it travels as a
wheel, see bench/NOTES_vae.md):

    python bench/vae.py [--sizes 480p,720p] [--frames 81] [--out DIR] [--profile]

Per size (latent 21 x 60 x 104 for 480p, 21 x 90 x 160 for 720p):
1. diffusers decode, and our frame-by-frame reference (`decode_reference`), once each after a warm-up;
2. our fast decode in several plans (latent frames per pass, full-rate frames per pass), output on the GPU
   and streamed to the CPU, and under the VRAM budget (3 GiB at 480p, 6 GiB at 720p) with the output on the
   CPU (the ComfyUI node's path) and on the GPU (which makes the planner tile);
3. max / mean abs difference of every decode to our frame-by-frame reference (bf16 both);
4. time: median of `--repeats` calls after one warm-up call (which also runs cuDNN's autotuning), wall clock
   around the whole call with the device synchronised; peak: `torch.cuda.max_memory_allocated` during the
   call minus what was allocated before it, plus the weights of the VAE being measured (so "peak" is what
   that VAE alone needs on the GPU, input latent included), next to the plan's modelled peak.
Then encode (I2V input: one image + zeros) at the first size, and optionally a profile of one fast decode.
A short table is printed last; everything goes to `--out` as JSON and a log.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from _checkout import ROOT, alias_checkout_as_package

alias_checkout_as_package()

from comfyui_turbodiffusion.wan_models.vae import LATENT_MEAN, LATENT_STD, WanVAE  # noqa: E402
from comfyui_turbodiffusion.wan_models.vae_plan import GIB, estimate_decode_bytes  # noqa: E402

SIZES = {"480p": (60, 104), "720p": (90, 160)}  # latent height, width
BUDGETS_GIB = {"480p": 3.0, "720p": 6.0}
DECODER_OUT_KEYS = ("decoder.head.2.weight", "decoder.head.2.bias")
VARIANTS = [  # (label, decode options); the first is what `decode` does by default
    ("fast (defaults: k=1, cuDNN autotuned)", {}),
    ("fast k=2", {"frames_per_chunk": 2}),
    ("fast k=1, full-rate 2 frames per pass", {"frames_per_pass": 2}),
]
DEVICE = "cuda"
STARTED = 0.0
TIME_LIMIT_S = 240.0
LOG: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LOG.append(line)


def random_state_dict(base_dim: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter random (conv weights normal / sqrt(fan_in), gammas 1 +- 0.2, biases small; the last
    decoder conv x0.3 so that few pixels clamp), as tests/vae_reference.py makes them."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in WanVAE(base_dim).state_dict().items()}
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("gamma"):
            value = 1.0 + 0.4 * (torch.rand(shape, generator=generator, device=device) - 0.5)
        elif name.endswith("bias"):
            value = 0.05 * torch.randn(shape, generator=generator, device=device)
        else:
            fan_in = shape[1] * math.prod(shape[2:])
            value = torch.randn(shape, generator=generator, device=device) / math.sqrt(fan_in)
        state[name] = value * 0.3 if name in DECODER_OUT_KEYS else value
    return state


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(label: str, call, repeats: int, weights: int, warmup: bool = True) -> dict | None:
    """An optional warm-up call, then `repeats` timed calls; times, peak and the last output. None (skipped)
    once the run has used up `--seconds`."""
    if time.perf_counter() - STARTED > TIME_LIMIT_S:
        say(f"  {label:<44} skipped (time limit)")
        return None
    warmup_s, warmup_peak = 0.0, 0
    if warmup:
        synchronize()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        call()
        synchronize()
        warmup_s = time.perf_counter() - start
        if DEVICE == "cuda":
            warmup_peak = torch.cuda.max_memory_allocated() - before + weights
    times, peak, output = [], 0, None
    for _ in range(repeats):
        output = None
        synchronize()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        output = call()
        synchronize()
        times.append(time.perf_counter() - start)
        if DEVICE == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - before + weights)
    result = {"label": label, "seconds": statistics.median(times), "times": times, "warmup_s": warmup_s}
    result |= {"peak_gib": peak / GIB, "warmup_peak_gib": warmup_peak / GIB}
    say(
        f"  {label:<44} {result['seconds']:7.3f} s  peak {peak / GIB:6.2f} GiB "
        f"(warm-up {warmup_s:6.2f} s, {warmup_peak / GIB:6.2f} GiB)"
    )
    return result | {"output": output}


def compare(result: dict | None, reference: torch.Tensor) -> dict | None:
    if result is None:
        return None
    output = result.pop("output")
    difference = (output.to(reference.device).float() - reference).abs()
    result["max_abs_diff"] = difference.max().item()
    result["mean_abs_diff"] = difference.mean().item()
    say(f"    vs frame-by-frame: max {result['max_abs_diff']:.3e}, mean {result['mean_abs_diff']:.3e}")
    return result


def latent_for(size: str, frames: int, seed: int) -> torch.Tensor:
    height, width = SIZES[size]
    generator = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randn(1, 16, 1 + (frames - 1) // 4, height, width, generator=generator, device=DEVICE)


def latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    return torch.tensor(LATENT_MEAN, device=DEVICE).view(shape), torch.tensor(LATENT_STD, device=DEVICE).view(
        shape
    )


def bench_size(size: str, args, ours: WanVAE, theirs, base_dim: int) -> list[dict]:
    latent = latent_for(size, args.frames, seed=7)
    mean, std = latent_stats()
    raw = (latent * std + mean).to(theirs.dtype)
    ours_weights, theirs_weights = weight_bytes(ours), weight_bytes(theirs)
    height, width = SIZES[size]
    say(f"{size}: latent {tuple(latent.shape)} -> video {args.frames} x {8 * height} x {8 * width}")
    rows = []

    reference = measure(
        "ours frame-by-frame (decode_reference)",
        lambda: ours.decode_reference(latent),
        1,
        ours_weights,
        warmup=False,
    )
    reference_video = reference.pop("output")
    rows.append(reference)
    rows.append(
        compare(
            measure(
                "diffusers AutoencoderKLWan.decode",
                lambda: theirs.decode(raw).sample,
                args.repeats,
                theirs_weights,
            ),
            reference_video,
        )
    )

    def add_ours(label: str, options: dict, output_on_device: bool = True) -> None:
        result = measure(label, lambda: ours.decode(latent, **options), args.repeats, ours_weights)
        if result is not None:
            plan = ours.decode_plan(latent.shape, **options)
            estimate = estimate_decode_bytes(plan, latent.shape, base_dim, 2, output_on_device)
            result |= {"plan": plan.describe(), "model_peak_gib": (estimate + ours_weights) / GIB}
        rows.append(compare(result, reference_video))

    for label, options in VARIANTS:
        add_ours(label, options)
    timed = [r for r in rows if r and r["label"] in dict(VARIANTS)]
    best_label = min(timed, key=lambda r: r["seconds"])["label"]
    add_ours(f"{best_label}, output to CPU", dict(VARIANTS)[best_label] | {"output_device": "cpu"}, False)
    budget = BUDGETS_GIB.get(size, args.smoke_budget_gib)
    for where in ("cpu", DEVICE):
        options = {"vram_budget_gib": budget, "output_device": where}
        add_ours(f"budget {budget} GiB, output {where}", options, where == DEVICE)
        if rows[-1] is not None:
            rows[-1]["within_budget"] = rows[-1]["peak_gib"] <= budget
            say(f"    plan: {rows[-1]['plan']}; within budget: {rows[-1]['within_budget']}")
    return [row for row in rows if row is not None]


def bench_encode(size: str, args, ours: WanVAE, theirs) -> list[dict]:
    height, width = SIZES[size]
    video = torch.zeros(1, 3, args.frames, 8 * height, 8 * width, device=DEVICE)
    video[:, :, 0] = torch.rand(1, 3, 8 * height, 8 * width, device=DEVICE) * 2 - 1
    say(f"encode {size}: one image + {args.frames - 1} zero frames (the I2V condition)")
    reference = measure(
        "ours encode_reference", lambda: ours.encode_reference(video), 1, weight_bytes(ours), warmup=False
    )
    reference_latent = reference.pop("output")
    rows = [reference]
    mean, std = latent_stats()

    def diffusers_encode() -> torch.Tensor:
        return (theirs.encode(video.to(theirs.dtype)).latent_dist.mean.float() - mean) / std

    result = measure(
        "diffusers encode (posterior mean)", diffusers_encode, args.repeats, weight_bytes(theirs)
    )
    rows.append(compare(result, reference_latent))
    for chunk in (1, 2):
        label = f"ours encode, {chunk} latent frame(s) per pass"
        encode = lambda c=chunk: ours.encode(video, frames_per_chunk=c)  # noqa: E731
        rows.append(compare(measure(label, encode, args.repeats, weight_bytes(ours)), reference_latent))
    return [row for row in rows if row is not None]


def profile_decode(size: str, ours: WanVAE, out: Path) -> None:
    latent = latent_for(size, 81, seed=8)
    ours.decode(latent)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours.decode(latent)
        synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=80)
    (out / "vae_profile.txt").write_text(table)
    say(f"profile of one fast decode at {size} (top kernels by CUDA time; full table in vae_profile.txt):")
    for line in table.splitlines()[:14]:
        say("  " + line[:160])


def main() -> None:
    global DEVICE, STARTED, TIME_LIMIT_S
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="480p,720p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_vae_out"))
    parser.add_argument("--seconds", type=float, default=240.0, help="skip the runs that would start later")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, base width 8, tiny latent: checks the script"
    )
    parser.add_argument("--smoke-budget-gib", type=float, default=0.25)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    STARTED, TIME_LIMIT_S = time.perf_counter(), args.seconds
    base_dim = 96
    if args.smoke:
        DEVICE, base_dim, args.sizes = "cpu", 8, "tiny"
        SIZES["tiny"] = (4, 6)

    if args.smoke:  # CPU torch here: let diffusers import next to it as the tests do
        sys.path.insert(0, str(ROOT / "tests"))
        from pipeline_torchvision import import_transforms_v2

        import_transforms_v2()
    import diffusers
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu"
    cudnn = torch.backends.cudnn.version()
    say(f"device {name}, torch {torch.__version__}, cuDNN {cudnn}, diffusers {diffusers.__version__}")
    state = random_state_dict(base_dim, DEVICE, seed=0)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    ours = WanVAE(base_dim).to(DEVICE)
    ours.load_state_dict(state, strict=True)
    ours = ours.to(dtype).eval()
    theirs = AutoencoderKLWan(base_dim=base_dim)  # otherwise diffusers' defaults: the Wan2.1 configuration
    theirs.load_state_dict(convert_wan_vae_to_diffusers(dict(state)), strict=True)
    theirs = theirs.to(DEVICE, dtype).eval()
    del state
    results: dict = {
        "device": name,
        "torch": torch.__version__,
        "cudnn": cudnn,
        "diffusers": diffusers.__version__,
    }
    with torch.no_grad():
        ours.decode_reference(latent_for(args.sizes.split(",")[0], 1, seed=1)[..., :8, :8])  # CUDA start-up
        for size in args.sizes.split(","):
            results[size] = bench_size(size, args, ours, theirs, base_dim)
        if not args.skip_encode:
            size = args.sizes.split(",")[0]
            results[f"encode {size}"] = bench_encode(size, args, ours, theirs)
        if args.profile and DEVICE == "cuda":
            profile_decode(args.sizes.split(",")[0], ours, args.out)
    results["bench_seconds"] = time.perf_counter() - STARTED
    (args.out / "vae_bench.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    (args.out / "vae_bench.log").write_text("\n".join(LOG) + "\n")


def print_table(results: dict) -> None:
    say("")
    say(f"{'run':<58} {'time s':>7} {'peak GiB':>8} {'model':>6} {'max diff':>9} {'speed-up':>8}")
    for key, rows in results.items():
        if not isinstance(rows, list):
            continue
        baseline = next((r["seconds"] for r in rows if r["label"].startswith("diffusers")), None)
        for row in rows:
            speedup = f"{baseline / row['seconds']:.2f}x" if baseline else ""
            model = f"{row['model_peak_gib']:.2f}" if "model_peak_gib" in row else ""
            diff = f"{row['max_abs_diff']:.2e}" if "max_abs_diff" in row else ""
            say(
                f"{key + ' ' + row['label']:<58.58} {row['seconds']:7.3f} {row['peak_gib']:8.2f} {model:>6} "
                f"{diff:>9} {speedup:>8}"
            )


if __name__ == "__main__":
    main()
