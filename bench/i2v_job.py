"""The whole Wan2.2 A14B image-to-video job at 720p under a 24 GiB GPU cap (issue 6), and the job uncapped.

Random weights at real size, built in memory (no files) and placed as a 24 GB user's job places them:

* two A14B experts, each generated as a bf16 state dict on the GPU and loaded through `dit_from_state_dict`
  with `linear_quant="int8"` (quantised one layer at a time on the GPU, like `load_dit`), landing on the CPU;
  block swap planned from the cap by `plan_block_swap` (the cap minus what else stays on the GPU);
* the umT5-XXL text encoder (bf16, on the CPU; encoded on the GPU with `text_encoder_device`, then back);
* the Wan2.1 VAE (bf16, on the GPU throughout, as in the reference), decoding with `decode_vram_budget_gib`;
* a 1280x720 test image.

`generate_i2v` then runs 4 steps, 81 frames, sagesla, boundary 0.9 under
`torch.cuda.set_per_process_memory_fraction(cap)`. Per stage (text encoding, image encoding, each expert's
sampling, the expert swap, the experts' return home, VAE decoding) it prints the wall time and the peak of
`torch.cuda.max_memory_allocated` (the CUDA context is not included), then the same job without cap, block
swap or decode budget, for the time overhead. A stage that fails (e.g. out of memory) ends that job; the table
of what ran is printed anyway.

Usage, from the repository root:
    python bench/i2v_job.py               # CUDA GPU with >= 64 GB (H100 / H200): ~2-3 minutes
    python bench/i2v_job.py --dry-run     # tiny models on the CPU: checks the code path in seconds
Options: --cap-gb (24), --attention sagesla|sla|sdpa, --frames (81), --steps (4), --time-limit seconds after
which the uncapped job is not started (200), --skip-uncapped.
The tokenizer is a byte-level stand-in (the weights are random, so the vocabulary does not matter).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from _checkout import ROOT, alias_checkout_as_package
from _environment import environment_line
from PIL import Image

alias_checkout_as_package()

from _models import random_weights, state_shapes  # noqa: E402
from comfyui_turbodiffusion.wan_models.block_swap import (  # noqa: E402
    GIB,
    enable_block_swap,
    plan_block_swap,
    tensor_bytes,
)
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig  # noqa: E402
from comfyui_turbodiffusion.wan_models.dit_loader import dit_from_state_dict  # noqa: E402
from comfyui_turbodiffusion.wan_models.pipeline import generate_i2v  # noqa: E402
from comfyui_turbodiffusion.wan_models.resolution import latent_shape  # noqa: E402
from comfyui_turbodiffusion.wan_models.vae import WanVAE  # noqa: E402

PROMPT = (
    "A golden retriever runs along a beach at sunset, waves rolling in, the camera tracking beside it, "
    "warm light, shallow depth of field, cinematic."
)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)
UMT5_TINY = dict(vocab_size=512, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)
TINY_DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64, in_dim=36, has_sla_proj=True)
TINY_VAE_DIM = 8
TINY_SIZE = (64, 48)
# What else stays on the GPU while an expert samples, besides the VAE's weights: the sampler's float64 state,
# noise, velocity, the conditioning y (float32 and bf16) and the context; about 0.3 GiB at 720p x 81.
SAMPLER_STATE_GIB = 0.5
# Kept free of the decode budget for the latent, y and context still alive while the VAE decodes.
DECODE_MARGIN_GIB = 0.5
SLA_TOPK = 0.1


def say(text: str = "") -> None:
    print(text, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guard_torchvision() -> None:
    """tools/comfy_launch.py's import guard: lets transformers import where torchvision was built for another
    torch (the CPU dev machine); no effect where it matches."""
    spec = importlib.util.spec_from_file_location("comfy_launch", ROOT / "tools" / "comfy_launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfy_launch"] = module  # the guard's import hook lives on in it
    spec.loader.exec_module(module)
    module.install_guard()


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------- models


def build_expert(config: WanDiTConfig, work: torch.device, seed: int, attention: str) -> torch.nn.Module:
    """An int8 A14B expert on the CPU, made the way `load_dit(path, device="cpu", linear_quant="int8",
    quantize_device=work)` makes it (one layer at a time on `work`)."""
    state = random_weights(state_shapes(config), work, seed)
    model = dit_from_state_dict(
        state, device="cpu", attention=attention, sla_topk=SLA_TOPK, linear_quant="int8", quantize_device=work
    )
    del state
    reset_memory(work)
    return model


def byte_tokenizer():
    """A stand-in for umT5's SentencePiece tokenizer: UTF-8 bytes shifted past pad 0 / EOS 1 / unk 2."""
    from comfyui_turbodiffusion.wan_models.tokenizer import PromptTokenizer

    return PromptTokenizer(lambda text: [3 + b for b in text.encode()], 259, 1, 0, "byte-level stand-in")


def build_text_encoder(shape: dict, work: torch.device, seed: int) -> torch.nn.Module:
    """A random bf16 umT5 encoder on the CPU, built as `load_text_encoder` builds it."""
    from comfyui_turbodiffusion.wan_models.text_encoder import (
        UMT5TextEncoder,
        build_umt5_encoder,
        umt5_encoder_config,
    )

    model = build_umt5_encoder(umt5_encoder_config(**shape)).to(torch.bfloat16).to_empty(device=work)
    model.encoder.embed_tokens = model.shared
    generator = torch.Generator(work).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                tensor.uniform_(0.8, 1.2, generator=generator)
            elif "relative_attention_bias" in name:
                tensor.normal_(0, 0.5, generator=generator)
            elif name == "shared.weight":
                tensor.normal_(0, 1, generator=generator)
            else:
                tensor.normal_(0, 1 / math.sqrt(tensor.shape[1]), generator=generator)
    model = model.requires_grad_(False).eval().to("cpu")
    reset_memory(work)
    return UMT5TextEncoder(model, byte_tokenizer())


def build_vae(base_dim: int, device: torch.device, seed: int) -> WanVAE:
    """The Wan2.1 VAE in bf16, every tensor random (conv weights N(0, 1/fan_in), gammas 1 ± 0.2)."""
    with torch.device("meta"):
        vae = WanVAE(base_dim)
    vae = vae.to(torch.bfloat16).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in vae.named_parameters():
            if name.endswith("gamma"):
                tensor.uniform_(0.8, 1.2, generator=generator)
            elif name.endswith("bias"):
                tensor.normal_(0, 0.05, generator=generator)
            else:
                scale = 0.3 if name.startswith("decoder.head.2") else 1.0
                tensor.normal_(0, scale / math.sqrt(tensor[0].numel()), generator=generator)
    return vae.requires_grad_(False).eval()


def test_image(width: int, height: int) -> Image.Image:
    """Smooth colour gradients with some noise, so that the VAE sees image-like input."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    red = 128 + 100 * np.sin(x / 97.0) * np.cos(y / 61.0)
    green = 255 * x / max(width - 1, 1)
    blue = 255 * y / max(height - 1, 1)
    pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@dataclass
class Models:
    high: torch.nn.Module
    low: torch.nn.Module
    vae: WanVAE
    text_encoder: torch.nn.Module | None
    image: Image.Image
    size: tuple[int, int]
    text_encoder_note: str = ""


def build_models(args, device: torch.device) -> Models:
    if args.dry_run:
        config, te_shape, vae_dim, size = WanDiTConfig(**TINY_DIT), UMT5_TINY, TINY_VAE_DIM, TINY_SIZE
    else:
        config = WanDiTConfig.from_name("wan2.2-i2v-a14b", has_sla_proj=True)
        te_shape, vae_dim, size = UMT5_XXL, 96, (1280, 720)
    start = time.perf_counter()
    high = build_expert(config, device, seed=1, attention=args.attention)
    say(f"  high-noise expert: int8, {tensor_bytes(high) / GIB:.2f} GiB on the CPU ({_since(start)})")
    low = build_expert(config, device, seed=2, attention=args.attention)
    say(f"  low-noise expert: int8, {tensor_bytes(low) / GIB:.2f} GiB on the CPU ({_since(start)})")
    text_encoder, note = None, ""
    try:
        text_encoder = build_text_encoder(te_shape, device, seed=3)
        say(f"  umT5 encoder: bf16, {tensor_bytes(text_encoder) / GIB:.2f} GiB on the CPU ({_since(start)})")
    except Exception as error:  # e.g. transformers or ftfy missing: the rest of the job still runs
        traceback.print_exc()
        note = f"text encoder not built ({error}); the job uses a random context instead"
        say(f"  {note}")
    vae = build_vae(vae_dim, device, seed=4)
    say(f"  VAE: bf16, {tensor_bytes(vae) / GIB:.3f} GiB on {device} ({_since(start)})")
    return Models(high, low, vae, text_encoder, test_image(*size), size, note)


def _since(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class StageMeter:
    """Wall time and peak allocated memory of the intervals between marks, labelled by stage."""

    device: torch.device
    rows: list[tuple[str, float, float]] = field(default_factory=list)
    last_expert: str | None = None
    last: float = 0.0

    def start(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.last = time.perf_counter()

    def mark(self, label: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        peak = float("nan")
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / GIB
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rows.append((label, now - self.last, peak))
        self.last = now

    def stages(self) -> list[tuple[str, float, float]]:
        """Rows merged by label in order of first appearance: summed seconds, maximal peak."""
        merged: dict[str, list[float]] = {}
        for label, seconds, peak in self.rows:
            entry = merged.setdefault(label, [0.0, float("nan")])
            entry[0] += seconds
            entry[1] = peak if math.isnan(entry[1]) else max(entry[1], peak)
        return [(label, seconds, peak) for label, (seconds, peak) in merged.items()]


class Instrumented:
    """Marks stage boundaries on the job's models: around text encoding, VAE encoding and decoding, and every
    expert forward. Removed (originals restored) by `remove()`."""

    def __init__(self, models: Models, meter: StageMeter) -> None:
        self.meter = meter
        self.undo: list[Callable[[], None]] = []
        if models.text_encoder is not None:
            self._wrap(models.text_encoder, "encode", "text encoding", "text encoding")
        self._wrap(models.vae, "encode", "text encoding", "image encoding (VAE)")
        self._wrap(models.vae, "decode", "experts back to the CPU", "VAE decoding")
        for name, expert in (("high-noise", models.high), ("low-noise", models.low)):
            # Prepended: the mark synchronises, which must not wait for block swap's first prefetches.
            pre_hook = expert.register_forward_pre_hook(self._before_step(name), prepend=True)
            self.undo.append(pre_hook.remove)
            self.undo.append(expert.register_forward_hook(self._after_step(name)).remove)

    def _wrap(self, module: torch.nn.Module, method: str, before: str, after: str) -> None:
        original = getattr(module, method)

        def wrapped(*args, **kwargs):
            self.meter.mark(before)
            out = original(*args, **kwargs)
            self.meter.mark(after)
            return out

        setattr(module, method, wrapped)  # an instance attribute shadows the method
        self.undo.append(lambda: delattr(module, method))

    def _before_step(self, name: str):
        def hook(module, args):
            last = self.meter.last_expert
            label = f"{name} expert upload" if last is None else "expert swap" if last != name else None
            self.meter.mark(label or f"{name} sampling")

        return hook

    def _after_step(self, name: str):
        def hook(module, args, output):
            self.meter.mark(f"{name} sampling")
            self.meter.last_expert = name

        return hook

    def remove(self) -> None:
        for undo in self.undo:
            undo()


@dataclass
class JobReport:
    label: str
    stages: list[tuple[str, float, float]]
    timings: dict[str, float]
    status: str
    seconds: float
    overall_peak: float


def run_job(
    label: str,
    models: Models,
    device: torch.device,
    args,
    cap_gib: float | None = None,
    decode_budget_gib: float | None = None,
) -> JobReport:
    say(f"{label}: running")
    meter = StageMeter(device)
    instruments = Instrumented(models, meter)
    timings: dict[str, float] = {}
    status = "OK"
    for module in (models.high, models.low, models.text_encoder):
        if module is not None:
            module.to("cpu")
    reset_memory(device)
    overall = float("nan")
    start = time.perf_counter()
    try:
        if cap_gib is not None and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
        meter.start()
        result = generate_i2v(
            models.high,
            models.low,
            models.vae,
            models.image,
            prompt=PROMPT if models.text_encoder is not None else None,
            text_encoder=models.text_encoder,
            context=None if models.text_encoder is not None else random_context(models.high, device),
            text_encoder_device=device,
            width=models.size[0],
            height=models.size[1],
            num_frames=args.frames,
            steps=args.steps,
            boundary=0.9,
            attention=args.attention,
            sla_topk=1.0 if args.dry_run else SLA_TOPK,
            seed=0,
            device=device,
            return_frames=False,
            decode_vram_budget_gib=decode_budget_gib,
        )
        meter.mark("finishing")
        timings = result.timings
        if not torch.isfinite(result.latent).all():
            status = "non-finite latent"
    except torch.cuda.OutOfMemoryError as error:
        meter.mark("FAILED here")
        status = f"OUT OF MEMORY: {str(error).splitlines()[0][:160]}"
    except Exception as error:
        meter.mark("FAILED here")
        traceback.print_exc()
        status = f"failed: {error!r}"[:200]
    finally:
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        instruments.remove()
        peaks = [peak for _, _, peak in meter.rows if not math.isnan(peak)]
        overall = max(peaks) if peaks else float("nan")
        reset_memory(device)
    if cap_gib is not None and status == "OK" and device.type == "cuda":
        status = (
            f"OK under the {cap_gib:g} GiB cap" if overall <= cap_gib else f"OVER the {cap_gib:g} GiB cap"
        )
    say(f"{label}: {status} ({seconds:.1f} s)")
    return JobReport(label, meter.stages(), timings, status, seconds, overall)


def random_context(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(5)
    context = torch.zeros(1, 512, model.config.text_dim, device=device)
    context[:, :40] = 0.3 * torch.randn(1, 40, model.config.text_dim, generator=generator, device=device)
    return context.to(torch.bfloat16)


def plan_swaps(models: Models, cap_gib: float, frames: int) -> int:
    """Blocks to swap per expert so that one expert's step fits the cap beside the VAE and sampler state."""
    shape = latent_shape(*models.size, frames)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    reserved = tensor_bytes(models.vae) + int(SAMPLER_STATE_GIB * GIB)
    plan = plan_block_swap(models.high, cap_gib, tokens, reserved_bytes=reserved)
    say(
        f"swap plan: {plan.swapped_blocks} of {plan.num_blocks} blocks per expert for the {cap_gib:.3g} GiB "
        f"cap (reserved: VAE + {SAMPLER_STATE_GIB} GiB sampler state = {reserved / GIB:.2f} GiB): weights on "
        f"the GPU {plan.device_weight_bytes / GIB:.2f} GiB + estimated activations "
        f"{plan.activation_bytes / GIB:.2f} GiB ({tokens} tokens)"
    )
    return plan.swapped_blocks


def print_report(reports: list[JobReport], cap_gib: float, swapped: int) -> None:
    say()
    say(
        f"Per stage (seconds / peak allocated GiB in that stage; cap {cap_gib:.3g} GiB, "
        f"{swapped} swapped blocks):"
    )
    labels: list[str] = []
    for report in reports:
        labels += [label for label, _, _ in report.stages if label not in labels]
    header = ["stage", *(report.label for report in reports)]
    rows = []
    for label in labels:
        row = [label]
        for report in reports:
            found = [(s, p) for name, s, p in report.stages if name == label]
            row.append(f"{found[0][0]:7.2f} s {found[0][1]:6.2f} GiB" if found else "-")
        rows.append(row)
    rows.append(["total", *(f"{r.seconds:7.2f} s {r.overall_peak:6.2f} GiB" for r in reports)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        say(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
    say()
    for report in reports:
        stage_times = ", ".join(f"{name} {seconds:.2f}" for name, seconds in report.timings.items())
        say(f"{report.label}: {report.status}")
        if stage_times:
            say(f"  generate_i2v timings (s): {stage_times}")
    if len(reports) == 2 and all(r.timings for r in reports):
        capped, free = reports
        dit = [
            sum(r.timings.get(k, 0.0) for k in ("sampling_high_noise", "sampling_low_noise")) for r in reports
        ]
        say(
            f"time overhead of the cap: whole job {capped.seconds:.1f} s vs {free.seconds:.1f} s "
            f"({100 * (capped.seconds / free.seconds - 1):+.1f} %); "
            f"DiT sampling {dit[0]:.1f} s vs {dit[1]:.1f} s "
            f"({100 * (dit[0] / dit[1] - 1):+.1f} %)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--cap-gb", type=float, default=24.0, help="GPU memory cap in GiB (24)")
    parser.add_argument("--attention", default="sagesla", choices=("sagesla", "sla", "sdpa"))
    parser.add_argument("--frames", type=int, default=None, help="video frames (81; dry run 9)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=200.0, help="no uncapped job after this many s")
    parser.add_argument("--skip-uncapped", action="store_true")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run with --dry-run to check the script on the CPU")
    args.frames = args.frames or (9 if args.dry_run else 81)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    guard_torchvision()
    say(environment_line(device))
    say(
        f"A14B I2V job: {args.frames} frames, {args.steps} steps, {args.attention}, boundary 0.9; "
        "building models"
    )
    cap_gib = args.cap_gb
    reports: list[JobReport] = []
    swapped = 0
    try:
        models = build_models(args, device)
        if models.text_encoder_note:
            say(f"NOTE: {models.text_encoder_note}")
        if args.dry_run:
            cap_gib = dry_run_cap(models, args.frames)
        warm_up(models, device, args)
        swapped = plan_swaps(models, cap_gib, args.frames)
        swaps = (
            [enable_block_swap(expert, swapped) for expert in (models.high, models.low)] if swapped else []
        )
        # The dry run's cap is too small for the tiniest decode plan; there the budget only selects a plan.
        decode_budget = 1.0 if args.dry_run else cap_gib - DECODE_MARGIN_GIB
        reports.append(run_job("capped", models, device, args, cap_gib, decode_budget))
        for swap in swaps:
            swap.remove()
        if args.skip_uncapped or time.perf_counter() - start > args.time_limit:
            say("uncapped job skipped (--skip-uncapped or past --time-limit)")
        else:
            reports.append(run_job("uncapped", models, device, args))
    except Exception:
        traceback.print_exc()
    finally:
        print_report(reports, cap_gib, swapped)
        say(f"script total {time.perf_counter() - start:.0f} s")
    sys.exit(0 if reports and reports[0].status.startswith("OK") else 1)


def warm_up(models: Models, device: torch.device, args) -> None:
    """One short job at the same frame size (5 frames) so that kernel compilation and cuDNN autotuning do not
    land in the measured jobs."""
    start = time.perf_counter()
    warm = argparse.Namespace(**{**vars(args), "frames": 5})
    report = run_job("warm-up (5 frames, uncapped)", models, device, warm)
    say(f"warm-up done in {_since(start)}: {report.status}")


def dry_run_cap(models: Models, frames: int) -> float:
    """A cap under which the tiny expert must swap all but one of its blocks."""
    shape = latent_shape(*models.size, frames)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    full = plan_block_swap(models.high, 1e6, tokens)
    needed = full.device_bytes - full.block_bytes + tensor_bytes(models.vae)
    return needed / GIB + SAMPLER_STATE_GIB


if __name__ == "__main__":
    main()
