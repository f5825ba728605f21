"""The rCM few-step sampler node."""

from __future__ import annotations

from contextlib import contextmanager

import comfy.utils
import torch
from comfy import model_management as mm

from .. import wan_models
from ..wan_models.sampler import I2V_IN_DIM, MAX_STEPS, SAMPLER_MODES
from ..wan_models.text_encoder import pad_context_to_512
from .comfy_conditioning import single_context, start_image_condition
from .comfy_latent import to_comfy_latent
from .model_patchers import TurboPatcher, load_to_device, reconcile_after_sampling
from .stage_timing import log_stage
from .vram_budget import apply_vram_budget, plan_vram_budget

CATEGORY = "TurboDiffusion"
NODE = "TD_RCMSampler"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
MAX_VRAM_GB = 1024.0


@contextmanager
def interrupt_checks(*models: torch.nn.Module):
    """Check ComfyUI's interrupt flag before every transformer block, so Cancel stops within a block; before
    every step for models whose forward is replayed or compiled (a per-block check would run only while
    capturing, or make torch.compile recompile for every new hook)."""

    def check(module, args):
        mm.throw_exception_if_processing_interrupted()

    handles = []
    for model in models:
        blocks = getattr(model, "blocks", None)
        per_block = blocks is not None and getattr(model, "forward_runner", None) is None
        for block in blocks if per_block else [model]:
            handles.append(block.register_forward_pre_hook(check))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_pairing(model: TurboPatcher, condition: torch.Tensor | None, context: torch.Tensor) -> None:
    config = model.network.config
    if config.in_dim == I2V_IN_DIM and condition is None:
        raise ValueError(
            f"{NODE}: '{model.label}' is a Wan2.2 I2V expert (in_dim {I2V_IN_DIM}) and needs a start "
            f"image, but the positive conditioning has none (a text-to-video latent). Connect "
            f"TD_ImageToVideo's positive and latent outputs to this sampler, or load a Wan2.1 T2V model "
            f"for text-to-video."
        )
    if config.in_dim != I2V_IN_DIM and condition is not None:
        raise ValueError(
            f"{NODE}: '{model.label}' is a text-to-video model (in_dim {config.in_dim}), but the "
            f"conditioning carries a start image. For image-to-video load the Wan2.2 I2V A14B experts "
            f"(high noise as model, low noise as low_noise_model); for text-to-video connect TD_TextEncode "
            f"directly."
        )
    if context.shape[-1] != config.text_dim:
        raise ValueError(
            f"{NODE}: the conditioning is {context.shape[-1]} wide but '{model.label}' expects umT5 text "
            f"features of width {config.text_dim}; encode the prompt with the Wan umT5-XXL text encoder."
        )


def _check_low_noise_expert(model: TurboPatcher, low_noise_model: TurboPatcher | None) -> None:
    if low_noise_model is None:
        return
    if low_noise_model.network is model.network:
        raise ValueError(
            f"{NODE}: model and low_noise_model are the same model ('{model.label}'); load the high-noise "
            f"expert as model and the low-noise expert (TurboWan2.2-I2V-A14B-low-720P*.pth) with a second "
            f"TD_WanModelLoader as low_noise_model, or disconnect low_noise_model."
        )
    in_dim = low_noise_model.network.config.in_dim
    if in_dim != I2V_IN_DIM:
        raise ValueError(
            f"{NODE}: low_noise_model '{low_noise_model.label}' is a text-to-video model (in_dim {in_dim}), "
            f"but it takes the Wan2.2 I2V A14B low-noise expert (TurboWan2.2-I2V-A14B-low-720P*.pth); load "
            f"that file there, or disconnect low_noise_model for text-to-video."
        )


def _log_sampling(stats: wan_models.SamplingStats) -> None:
    steps = stats.steps_per_model
    for label, seconds in stats.seconds_per_model.items():
        stage = "sampling" if label == "model" else f"sampling ({label.replace('_', ' ')} expert)"
        log_stage(stage, seconds, f"{steps.get(label, 0)} steps")
    log_stage("model transfer", stats.transfer_seconds)


class TD_RCMSampler:
    DESCRIPTION = (
        "TurboDiffusion's rCM sampler: a video in 1-4 steps, no CFG. With low_noise_model it runs the Wan2.2 "
        "I2V A14B expert pair (high noise while t >= boundary, then low noise)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The sampled Wan latent (raw VAE mean, as core VAEDecode with the Wan VAE expects).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TD_WAN_MODEL", {"tooltip": "The DiT (the high-noise expert for Wan2.2 I2V)."}),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "The prompt: TD_TextEncode, CLIPTextEncode with umT5, or TD_ImageToVideo."},
                ),
                "latent": (
                    "LATENT",
                    {"tooltip": "Sets the video size and batch: TD_EmptyVideoLatent or TD_ImageToVideo."},
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": SEED_MAX,
                        "control_after_generate": True,
                        "tooltip": "Seed of the noise (TurboDiffusion's default is 0).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": MAX_STEPS,
                        "tooltip": "Sampling steps, 1-4 (rCM distilled).",
                    },
                ),
                "sigma_max": (
                    "FLOAT",
                    {
                        "default": 80.0,
                        "min": 1.0,
                        "max": 5000.0,
                        "step": 1.0,
                        "tooltip": "Initial noise level: 80 for Wan2.1 T2V, 200 for Wan2.2 I2V; "
                        "larger values (e.g. 1600) reduce diversity.",
                    },
                ),
                "mode": (
                    list(SAMPLER_MODES),
                    {
                        "default": "sde",
                        "tooltip": "sde: fresh noise at every step (TurboDiffusion's default); "
                        "ode: deterministic (the I2V --ode option).",
                    },
                ),
            },
            "optional": {
                "low_noise_model": (
                    "TD_WAN_MODEL",
                    {"tooltip": "Wan2.2 I2V A14B low-noise expert; takes over once t < boundary."},
                ),
                "boundary": (
                    "FLOAT",
                    {
                        "default": 0.9,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Flow time t below which the low-noise expert runs (TurboDiffusion: 0.9).",
                    },
                ),
                "max_vram_gb": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": MAX_VRAM_GB,
                        "step": 0.1,
                        "tooltip": "The GPU memory (GB) the DiT may use while sampling, weights + "
                        "activations. Blocks beyond it stay in CPU memory and stream in during each step "
                        "(same output, slower); they stay there for later runs until the model is "
                        "reloaded. For a 24 GB card with other models unloaded try 22. 0: off (the whole "
                        "model on the GPU, or the loader's swap_blocks).",
                    },
                ),
            },
        }

    def sample(
        self,
        model,
        positive,
        latent,
        seed,
        steps,
        sigma_max,
        mode,
        low_noise_model=None,
        boundary=0.9,
        max_vram_gb=0.0,
    ):
        shape = tuple(latent["samples"].shape)
        context, options = single_context(positive, NODE)
        condition = start_image_condition(options, shape, NODE)
        _check_pairing(model, condition, context)
        _check_low_noise_expert(model, low_noise_model)
        context = pad_context_to_512(context)
        experts = [model] if low_noise_model is None else [model, low_noise_model]
        working_bytes = 0
        if max_vram_gb > 0:
            plans = plan_vram_budget(experts, max_vram_gb, shape, NODE)  # all checked before any change
            apply_vram_budget(plans, max_vram_gb, NODE)
            working_bytes = plans[0].working_bytes
        load_to_device(model, memory_required=working_bytes)
        progress = comfy.utils.ProgressBar(steps)
        stats = wan_models.SamplingStats()
        try:
            with interrupt_checks(*(expert.network for expert in experts)):
                final = wan_models.rcm_sample(
                    model.network,
                    context,
                    shape,
                    seed=seed,
                    steps=steps,
                    sigma_max=sigma_max,
                    mode=mode,
                    y=condition,
                    low_noise_model=None if low_noise_model is None else low_noise_model.network,
                    boundary=boundary,
                    # Both experts on the GPU at once would exceed a budget planned for one of them.
                    prefetch_experts=max_vram_gb <= 0,
                    device=model.load_device,
                    callback=lambda step, total: progress.update_absolute(step, total),
                    stats=stats,
                )
        finally:
            reconcile_after_sampling(experts)
        _log_sampling(stats)
        return (to_comfy_latent(final.to(mm.intermediate_device())),)
