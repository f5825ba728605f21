"""Real-size smoke run of the library on a CUDA GPU (random weights; numbers are a health check, not claims).

Writes a random Wan2.1-T2V-1.3B checkpoint in the TurboDiffusion `.pth` layout (bf16, fp32 norms, SLA proj_l),
loads it through `load_dit` (dense and int8-at-load), samples 480p x 81 frames with 4 rCM steps for every
attention backend, decodes with a real-config Wan VAE, and prints one table:

    python bench/gpu_smoke.py [--frames 81] [--workdir /tmp/td_smoke]

Relative differences are between backends on the same random model; with random weights they only show that
each path computes something close to dense attention, not output quality.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _checkout import alias_checkout_as_package

alias_checkout_as_package()

from comfyui_turbodiffusion.wan_models import (  # noqa: E402
    WanDiT,
    WanDiTConfig,
    WanVAE,
    load_dit,
    make_self_attention,
    rcm_sample,
    sdpa_attention,
)

FP32_NORM_SUFFIXES = ("norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias")


def random_turbodiffusion_checkpoint(path: Path, seed: int = 0) -> None:
    config = WanDiTConfig.from_name("wan2.1-t2v-1.3b", has_sla_proj=True)
    with torch.device("meta"):
        model = WanDiT(config, self_attention=sdpa_attention, cross_attention=sdpa_attention)
    generator = torch.Generator("cuda").manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(FP32_NORM_SUFFIXES):
            value = 1 + 0.1 * torch.randn(tensor.shape, device="cuda", generator=generator)
            state[name] = value if name.endswith("weight") else value - 1
            continue
        fan_in = tensor.shape[-1] if tensor.dim() > 1 else 1
        std = fan_in**-0.5 if tensor.dim() > 1 else 0.02
        state[name] = (std * torch.randn(tensor.shape, device="cuda", generator=generator)).to(torch.bfloat16)
    torch.save({k: v.cpu() for k, v in state.items()}, path)


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/td_smoke"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name())]

    checkpoint = args.workdir / "TurboWan2.1-T2V-1.3B-480P-random.pth"
    _, seconds = timed(lambda: random_turbodiffusion_checkpoint(checkpoint))
    rows.append(("write random 1.3B .pth", f"{seconds:.1f} s"))

    latent_frames = 1 + (args.frames - 1) // 4
    shape = (1, 16, latent_frames, 60, 104)
    context = torch.randn(1, 512, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    context[:, 100:] = 0
    context = context.to(torch.bfloat16)

    latents = {}
    for quant in ("none", "int8"):
        model, seconds = timed(lambda q=quant: load_dit(checkpoint, device="cuda", linear_quant=q))
        rows.append((f"load_dit linear_quant={quant}", f"{seconds:.1f} s"))
        for backend in ("sdpa", "sla", "sagesla"):
            if quant == "int8" and backend != "sagesla":
                continue
            model.set_self_attention(make_self_attention(backend, 0.1))
            rcm_sample(model, context, shape, seed=0, steps=1)  # warm-up: kernel compilation, RoPE tables
            latent, seconds = timed(lambda m=model: rcm_sample(m, context, shape, seed=0, steps=4))
            assert torch.isfinite(latent).all(), f"{backend}/{quant}: non-finite latent"
            latents[(quant, backend)] = latent
            rows.append(
                (f"4-step loop 480p x {args.frames}f, {backend}, linears {quant}", f"{seconds:.3f} s")
            )
        del model
        torch.cuda.empty_cache()
    dense = latents[("none", "sdpa")]
    for key, latent in latents.items():
        if key != ("none", "sdpa"):
            rows.append(
                (f"rel-L2 final latent {key[1]}/{key[0]} vs sdpa/none", f"{relative_l2(latent, dense):.4f}")
            )

    vae = WanVAE(base_dim=96).to("cuda", torch.bfloat16)
    generator = torch.Generator("cuda").manual_seed(2)
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if "gamma" in name:
                parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, device="cuda", generator=generator))
            elif parameter.dim() > 1:
                fan_in = parameter[0].numel()
                parameter.copy_(
                    torch.randn(parameter.shape, device="cuda", generator=generator) * fan_in**-0.5
                )
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        vae.decode(latents[("none", "sagesla")][:, :, :2])  # warm-up
        video, seconds = timed(lambda: vae.decode(latents[("none", "sagesla")]))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    rows.append((f"VAE decode 480p x {video.shape[2]}f (bf16)", f"{seconds:.3f} s, peak +{peak:.2f} GiB"))
    assert torch.isfinite(video).all()

    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
