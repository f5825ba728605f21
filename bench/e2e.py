"""Whole-job speed (issue 8): the 4-step DiT loop against TurboDiffusion's own network, and the whole
text-to-video job from the ComfyUI queue to the MP4, in one run with one table.

    python bench/e2e.py [--sizes 1.3b,14b] [--variants ...] [--skip comfy] [--json PATH]
    python bench/e2e.py --dry-run      # tiny models on the CPU: runs every code path, measures nothing

Before a GPU run, where the network is reachable: `python bench/e2e_prepare.py --turbodiffusion <clone>`
(reference files and a ComfyUI tree into .ref/, wheels into .whl/); then on the GPU, carrying .ref and .whl:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site python3 bench/e2e.py --json $OUT/e2e.json --workdir /tmp/e2e

(the exact `run` call is in bench/NOTES_e2e.md).

Per size (1.3B: 480p × 81 frames, latent 21×60×104; 14B: 720p × 81, latent 21×90×160), one set of random
weights as released (bf16, float32 norm weights, random SLA proj_l; FORMATS.md §5), shared by every network:

* reference: thu-ml/TurboDiffusion's WanModel (rcm/networks/wan2pt1.py) built by its modify_model.py with
  SLA attention (top-k 0.1, its Triton kernels) and FastNorm, run by the loop of wan2.1_t2v_infer.py;
  the stand-ins it needs here are printed (bench/e2e_reference.py);
* ours, top-k 0.1: `eager-sla` (the reference's attention type, PyTorch block ops: ours against theirs on
  equal terms), then sagesla: `eager` (PyTorch block ops, no graphs: the unoptimised path), `fused` (fused
  Triton block ops), `graphs` (fused + CUDA graphs: the optimised path), `int8` / `fp8` (graphs + W8A8
  linears quantised at load), `compile` (torch.compile, default mode; opt-in, compiling takes minutes).
Time: a warm-up forward at the shape (JIT, self-checks, graph capture), then `--repeats` (1.3B) or
`--repeats-14b` 4-step loops from the same noise, synchronised wall clock, median. Equality: the first-step
velocity of every path against `eager` on the same input (and the reference's against `eager-sla`), rel-L2
/ cosine / max |Δ|; the optimised path passes within bf16 tolerance (rel-L2 ≤ 2e-2, cos ≥ 0.9998), and a
graph replay must equal its eager capture run.
Whole job (1.3B 480p × 81): text encoding + 4 steps + VAE decode + MP4 through ComfyUI in this process
(bench/e2e_comfy.py), models loaded by a first run; then `--repeats` runs with a new prompt and seed each.
Targets: loop ≥ 3× the reference at both sizes; whole job ≤ 2.0 s on an H200 (2.4 s on an H100).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _checkout import ROOT, alias_checkout_as_package

alias_checkout_as_package()

import e2e_comfy  # noqa: E402
import e2e_reference  # noqa: E402
from _models import random_weights  # noqa: E402
from comfyui_turbodiffusion.wan_models.block_ops import make_block_ops  # noqa: E402
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig  # noqa: E402
from comfyui_turbodiffusion.wan_models.dit import WanDiT  # noqa: E402
from comfyui_turbodiffusion.wan_models.dit_loader import dit_from_state_dict  # noqa: E402
from comfyui_turbodiffusion.wan_models.sampler import network_timestep, rcm_sample, rcm_time_grid  # noqa: E402

SIZES = {
    "1.3b": dict(preset="wan2.1-t2v-1.3b", latent=(1, 16, 21, 60, 104), label="1.3B 480p x81"),
    "14b": dict(preset="wan2.1-t2v-14b", latent=(1, 16, 21, 90, 160), label="14B 720p x81"),
}
TINY = dict(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64, has_sla_proj=True)
TINY_LATENT = (1, 16, 2, 4, 6)
DEFAULT_VARIANTS = {"1.3b": "eager-sla,eager,fused,graphs,int8,int8rw,fp8", "14b": "eager,graphs,int8rw,fp8"}
VARIANTS = {  # name -> (self-attention, block ops, forward mode, linear storage)
    "eager-sla": ("sla", "torch", "none", "auto"),
    "eager": ("sagesla", "torch", "none", "auto"),
    "fused": ("sagesla", "auto", "none", "auto"),
    "graphs": ("sagesla", "auto", "cudagraphs", "auto"),
    "int8": ("sagesla", "auto", "cudagraphs", "int8"),
    "int8rw": ("sagesla", "auto", "cudagraphs", "int8_rowwise"),
    "fp8": ("sagesla", "auto", "cudagraphs", "fp8"),
    "compile": ("sagesla", "torch", "default", "auto"),
}
OPTIMISED = "graphs"
SLA_TOPK = 0.1
# Tiny sequences have fewer than 10 key blocks, where top-k 0.1 selects none: the dry run keeps them all, so
# that the sparse branches run too.
DRY_RUN_SLA_TOPK = 1.0
EQUAL_REL_L2, EQUAL_COS = 2e-2, 0.9998
TEXT_TOKENS = 24
PROMPTS = (
    "A red fox runs through a snowy forest at dawn, cinematic lighting.",
    "Two astronauts float inside a space station, Earth glowing through the window.",
    "A hummingbird hovers near a purple flower in slow motion, sharp focus.",
)
LOG: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LOG.append(line)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def weight_shapes(size: str, dry_run: bool) -> dict[str, torch.Size]:
    if not dry_run and e2e_reference.available() is None:
        return {key: shape for key, (shape, _) in e2e_reference.reference_state_shapes(size).items()}
    config = (
        WanDiTConfig(**TINY) if dry_run else WanDiTConfig.from_name(SIZES[size]["preset"], has_sla_proj=True)
    )
    with torch.device("meta"):
        model = WanDiT(config, self_attention=lambda *a, **k: None, cross_attention=lambda *a, **k: None)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def text_context(width: int, device: str, seed: int) -> torch.Tensor:
    """umT5-like features: a prompt's worth of tokens, zeros after (TURBODIFFUSION.md §8)."""
    generator = torch.Generator(device).manual_seed(seed)
    context = torch.zeros(1, 512, width, device=device)
    context[:, :TEXT_TOKENS] = 0.3 * torch.randn(1, TEXT_TOKENS, width, generator=generator, device=device)
    return context.to(torch.bfloat16)


def first_step_input(shape: tuple[int, ...], device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The network input of the loop's first step: noise · t_0 in bf16 and bf16(1000·t_0)."""
    t_grid = rcm_time_grid(4, 80.0, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(shape, generator=generator, device=device)
    return (noise.double() * t_grid[0]).to(torch.bfloat16), network_timestep(t_grid[0], shape[0])


def compare(candidate: torch.Tensor, baseline: torch.Tensor) -> dict:
    a, b = candidate.double().flatten(), baseline.double().flatten()
    return {
        "rel_l2": ((a - b).norm() / b.norm()).item(),
        "cos": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
        "max_abs": (a - b).abs().max().item(),
    }


def timed_loops(run, repeats: int, device: str) -> list[float]:
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def build_variant(name: str, state: dict, device: str, sla_topk: float):
    attention, block_ops, forward_mode, linear_quant = VARIANTS[name]
    model = dit_from_state_dict(
        state,
        device=device,
        attention=attention,
        sla_topk=sla_topk,
        linear_quant=linear_quant,
        forward_mode=forward_mode,
    )
    model.set_block_ops(make_block_ops(block_ops))
    return model


def run_size(size: str, args, device: str, results: dict) -> dict | None:
    """Part (a) and (b) at one size; returns the shared weights for part (c) (1.3B only)."""
    latent = TINY_LATENT if args.dry_run else SIZES[size]["latent"]
    label = "tiny (dry run)" if args.dry_run else SIZES[size]["label"]
    say(f"\n== {label}: latent {latent}")
    state = random_weights(weight_shapes(size, args.dry_run), device, seed=0)
    context = text_context(TINY["text_dim"] if args.dry_run else 4096, device, seed=1)
    x0, t0 = first_step_input(latent, device, seed=2)
    rows = results.setdefault("loops", [])
    repeats = args.repeats_14b if size == "14b" else args.repeats
    velocities: dict[str, torch.Tensor] = {}

    for name in args.variants.get(size, DEFAULT_VARIANTS[size]).split(","):
        if _out_of_time(args, f"{size} {name}"):
            break
        model = build_variant(name, state, device, DRY_RUN_SLA_TOPK if args.dry_run else SLA_TOPK)
        with torch.no_grad():
            velocities[name] = model(x0, t0, context).float()  # warm-up; for graphs: eager run + capture
            replayed = model(x0, t0, context).float() if name == OPTIMISED else None
            loop = functools.partial(rcm_sample, model, context, latent, seed=args.seed, device=device)
            seconds = timed_loops(loop, repeats, device)
        row = dict(size=size, variant=name, seconds=seconds)
        if replayed is not None:
            row["replay_equals_capture_run"] = bool(torch.equal(replayed, velocities[name]))
        rows.append(row)
        say(f"ours {name}: {_seconds(seconds)}")
        del model, replayed
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    # The reference runs after our paths: a fault in its kernels poisons the CUDA context, and our
    # numbers are then already measured and printed.
    run_reference(size, args, device, state, (x0, t0, context), velocities, rows)

    for name, velocity in velocities.items():
        baseline = velocities.get("eager-sla" if name == "reference" else "eager")
        if baseline is not None and baseline is not velocity:
            for row in rows:
                if row["size"] == size and row["variant"] == name:
                    row["vs_eager"] = compare(velocity, baseline)
    del velocities
    return state if size == "1.3b" else None


def run_reference(size, args, device, state, inputs, velocities, rows) -> None:
    """Part (a): the reference network's first-step velocity and its timed 4-step loops."""
    x0, t0, context = inputs
    latent = TINY_LATENT if args.dry_run else SIZES[size]["latent"]
    repeats = args.repeats_14b if size == "14b" else args.repeats
    reason = e2e_reference.available()
    if args.dry_run:
        reason = "dry run; " + _check_reference_keys(state) if reason is None or "CUDA" in reason else reason
    if "reference" in args.skip:
        reason = "skipped by --skip"
    if reason is None:
        net = e2e_reference.build_reference(size, state, SLA_TOPK, fast_norms=args.reference_norms == "fast")
        with torch.no_grad():
            timesteps = t0[:, None].to(x0.dtype)
            velocities["reference"] = net(
                x_B_C_T_H_W=x0, timesteps_B_T=timesteps, crossattn_emb=context
            ).float()
            loop = functools.partial(e2e_reference.reference_loop, net, context, latent, seed=args.seed)
            seconds = timed_loops(loop, repeats, device)
        rows.append(dict(size=size, variant="reference", seconds=seconds))
        norms = "FastNorm" if args.reference_norms == "fast" else "PyTorch norms (--default_norm)"
        say(f"reference (TurboDiffusion WanModel + SLA + {norms}): {_seconds(seconds)}")
        del net
    else:
        say(f"reference: not run ({reason})")


def _check_reference_keys(state: dict) -> str:
    """The reference imports (stand-ins included) and names its tensors as we do: checked on meta, 1.3B."""
    if not e2e_reference.REFERENCE_DIR.exists():
        return "reference files absent"
    reference = e2e_reference.reference_state_shapes("1.3b")
    config = WanDiTConfig.from_name("wan2.1-t2v-1.3b", has_sla_proj=True)
    with torch.device("meta"):
        ours = WanDiT(config, self_attention=None, cross_attention=None).state_dict()
    same = reference.keys() == ours.keys() and all(reference[k][0] == ours[k].shape for k in ours)
    verdict = "match" if same else "DIFFER from"
    return f"reference importable here, 1.3B tensor names and shapes {verdict} ours"


def run_whole_job(state: dict, args, device: str, results: dict) -> None:
    """Part (c): queue → MP4 through ComfyUI, 1.3B 480p × 81 (tiny sizes in the dry run)."""
    comfy_dir = ROOT / ".ref" / "ComfyUI"
    if not (comfy_dir / "execution.py").exists():
        comfy_dir = ROOT / ".comfyui" / "ComfyUI"
    if not (comfy_dir / "execution.py").exists():
        say("whole job: not run (no ComfyUI tree; run bench/e2e_prepare.py)")
        return
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="td_e2e_", dir=args.workdir))
    say(f"\n== whole job through ComfyUI ({comfy_dir}), files in {base}")
    models = base / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "vae").mkdir()
    (models / "text_encoders").mkdir()
    start = time.perf_counter()
    torch.save(
        {k: v.cpu() for k, v in state.items()}, models / "diffusion_models" / e2e_comfy.FILE_NAMES["dit"]
    )
    e2e_comfy.write_vae(models / "vae" / e2e_comfy.FILE_NAMES["vae"], 8 if args.dry_run else 96, device)
    shape = e2e_comfy.UMT5_TINY if args.dry_run else e2e_comfy.UMT5_XXL
    e2e_comfy.write_text_encoder(
        models / "text_encoders" / e2e_comfy.FILE_NAMES["text_encoder"], shape, device
    )
    say(f"random checkpoints written in {time.perf_counter() - start:.1f} s")
    execution = e2e_comfy.start_comfyui(comfy_dir, base, cpu=device == "cpu")
    executor = execution.PromptExecutor(
        e2e_comfy.QuietServer(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
    )
    size, frames = ((48, 32), 5) if args.dry_run else ((0, 0), 81)
    forward_mode = "cudagraphs"  # on the CPU it runs eagerly (logged)
    runs = []
    for index in range(args.repeats + 1):
        prompt = e2e_comfy.t2v_prompt(
            PROMPTS[index % len(PROMPTS)], args.seed + index, size, frames, forward_mode
        )
        run = e2e_comfy.queue(execution, executor, prompt, base)
        kind = "first (loads the models)" if index == 0 else "models loaded"
        stages = ", ".join(f"{stage} {seconds:.3f}" for stage, seconds in run["stages"])
        say(f"run {index} [{kind}]: {run['seconds']:.3f} s -> {run['video'].name} ({stages})")
        runs.append(
            dict(seconds=run["seconds"], stages=run["stages"], loaded=index > 0, video=str(run["video"]))
        )
        if not run["video"].exists() or run["video"].stat().st_size == 0:
            raise RuntimeError(f"ComfyUI reported {run['video']} but it was not written")
    results["whole_job"] = runs
    import comfy.model_management

    del executor  # its cache holds the loaded models
    comfy.model_management.unload_all_models()  # the GPU is needed for the next size
    gc.collect()


def _seconds(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s of {', '.join(f'{v:.3f}' for v in values)}"


def _out_of_time(args, what: str) -> bool:
    if time.perf_counter() - args.started > args.time_limit:
        say(f"time limit {args.time_limit:.0f} s reached: {what} and later parts not run")
        return True
    return False


def print_table(results: dict, device_name: str, dry_run: bool) -> None:
    say(f"\n== Summary ({device_name})")
    say("| size | path | 4-step loop s | vs reference | vs ours eager | first-step velocity vs ours eager* |")
    say("| --- | --- | ---: | ---: | ---: | --- |")
    loops = results.get("loops", [])
    for row in loops:
        median = statistics.median(row["seconds"])
        same = {r["variant"]: statistics.median(r["seconds"]) for r in loops if r["size"] == row["size"]}
        reference = f"{same['reference'] / median:.2f}x" if "reference" in same else "-"
        eager = f"{same['eager'] / median:.2f}x" if "eager" in same else "-"
        check = row.get("vs_eager")
        equality = "-" if check is None else f"rel-L2 {check['rel_l2']:.2e}, cos {check['cos']:.6f}"
        if "replay_equals_capture_run" in row:
            equality += ", replay == capture run" if row["replay_equals_capture_run"] else ", REPLAY DIFFERS"
        say(f"| {row['size']} | {row['variant']} | {median:.3f} | {reference} | {eager} | {equality} |")
    for size in sorted({row["size"] for row in loops}):
        same = {r["variant"]: statistics.median(r["seconds"]) for r in loops if r["size"] == size}
        ours = {name: value for name, value in same.items() if name not in ("reference", "eager")}
        if "reference" in same and ours and not dry_run:
            best = min(ours, key=ours.get)
            speedup = same["reference"] / ours[best]
            verdict = "met" if speedup >= 3 else "NOT met"
            say(f"{size}: best path {best}, {speedup:.2f}x the reference (target >= 3x: {verdict})")
        optimised = next((r for r in loops if r["size"] == size and r["variant"] == OPTIMISED), None)
        if optimised and "vs_eager" in optimised:
            check = optimised["vs_eager"]
            ok = check["rel_l2"] <= EQUAL_REL_L2 and check["cos"] >= EQUAL_COS
            ok = ok and optimised.get("replay_equals_capture_run", True)
            say(
                f"{size}: optimised path equals the unoptimised within bf16 tolerance: "
                + ("yes" if ok else "NO")
            )
    runs = [run for run in results.get("whole_job", []) if run["loaded"]]
    if dry_run:
        say("dry run: tiny models on the CPU; the code paths ran, the times and targets mean nothing")
    elif runs:
        best = min(run["seconds"] for run in runs)
        target = 2.4 if "H100" in device_name else 2.0
        verdict = "met" if best <= target else "NOT met"
        say(f"whole job (queue -> MP4, models loaded): best {best:.3f} s (target <= {target} s: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1.3b,14b")
    parser.add_argument("--variants", default="", help="e.g. 1.3b=eager,graphs;14b=eager,int8")
    parser.add_argument("--skip", default="", help="comma list of: reference, comfy")
    parser.add_argument(
        "--reference-norms",
        default="fast",
        choices=("fast", "default"),
        help="the reference's FastNorm Triton kernels (its default) or Wan's PyTorch norms (--default_norm)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed loops at 1.3B, and whole jobs")
    parser.add_argument("--repeats-14b", type=int, default=1, help="timed loops at 14B (about 20 s each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds; later parts are skipped")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, help="where the whole job's checkpoints and MP4s go")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU")
    args = parser.parse_args()
    args.started = time.perf_counter()
    e2e_comfy.guard_torchvision()
    args.skip = set(filter(None, args.skip.split(",")))
    args.variants = dict(item.split("=") for item in filter(None, args.variants.split(";")))
    if args.dry_run:
        args.sizes, args.repeats = "1.3b", 1
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/e2e.py needs a CUDA GPU (or --dry-run)")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    import triton

    say(f"bench/e2e.py on {device_name}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    say(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")
    say(f"command: {' '.join(sys.argv)}")
    if e2e_reference.available() is None and "reference" not in args.skip and not args.dry_run:
        _, rotary = e2e_reference.import_reference()
        say("reference stand-ins (modules the GPU image lacks):")
        for module, stand_in in e2e_reference.STAND_INS.items():
            say(f"  {module}: {stand_in}")
        say(f"  rotary stand-in runs {rotary}")
    results: dict = {"device": device_name, "argv": sys.argv}
    for size in args.sizes.split(","):
        if _out_of_time(args, size):
            break
        state = run_size(size, args, device, results)
        if state is not None and "comfy" not in args.skip and not _out_of_time(args, "whole job"):
            run_whole_job(state, args, device, results)
        del state
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    print_table(results, device_name, args.dry_run)
    say("* the reference against ours eager-sla (same attention type); every other path against ours eager")
    say(f"total {time.perf_counter() - args.started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({**results, "log": LOG}, indent=1, default=str))


if __name__ == "__main__":
    main()
