"""CONDITIONING in ComfyUI's layout for Wan, read and written by our nodes.

A CONDITIONING is a list of [context, options] pairs. Text conditioning is the umT5 context [B, L, 4096];
core CLIPTextEncode with a Wan umT5 encoder produces the same layout (L may be shorter than 512, the sampler
re-pads it). An image-to-video start image travels in the options as ComfyUI's WanImageToVideo puts it:
`concat_latent_image`, the raw VAE mean of [image, grey frames...], and `concat_mask` [1, 1, T, H, W] with 0
on the latent frames that are given and 1 on those to generate. Our sampler builds the DiT's 20-channel
condition y = [mask x4 | normalised latent] from them, so core WanImageToVideo output works with it too.
"""

from __future__ import annotations

import torch
from comfy import latent_formats

MASK_CHANNELS = 4


def text_conditioning(context: torch.Tensor) -> list:
    return [[context, {}]]


def single_context(conditioning: list, node: str) -> tuple[torch.Tensor, dict]:
    """The one (context, options) pair of a CONDITIONING; TurboDiffusion has no prompt mixing."""
    if not conditioning:
        raise ValueError(
            f"{node}: the positive conditioning is empty; connect TD_TextEncode or CLIPTextEncode"
        )
    if len(conditioning) > 1:
        raise ValueError(
            f"{node}: got {len(conditioning)} conditioning entries (combined prompts?), but TurboDiffusion "
            f"samples with a single prompt; connect one TD_TextEncode or CLIPTextEncode"
        )
    context, options = conditioning[0]
    if context.ndim != 3:
        raise ValueError(f"{node}: expected a text context [batch, tokens, width], got {list(context.shape)}")
    return context, options


def with_start_image(conditioning: list, condition: torch.Tensor) -> list:
    """Attach an I2V condition y [1, 20, T, H, W] (mask | normalised latent) in ComfyUI's keys."""
    raw_latent = latent_formats.Wan21().process_out(condition[:, MASK_CHANNELS:].float())
    generate_mask = 1.0 - condition[:, :1].float()
    return [
        [context, {**options, "concat_latent_image": raw_latent, "concat_mask": generate_mask}]
        for context, options in conditioning
    ]


def start_image_condition(options: dict, latent_shape: tuple[int, ...], node: str) -> torch.Tensor | None:
    """The DiT's condition y [1, 20, T, H, W] from conditioning options, or None for text-to-video."""
    raw_latent = options.get("concat_latent_image")
    if raw_latent is None:
        return None
    latent = latent_formats.Wan21().process_in(raw_latent.float())
    mask = options.get("concat_mask")
    if mask is None:
        generate = torch.ones_like(latent[:, :1])
    else:
        generate = mask.float().mean(dim=1, keepdim=True)
    if latent.shape[2:] != tuple(latent_shape[2:]) or generate.shape[2:] != latent.shape[2:]:
        raise ValueError(
            f"{node}: the start-image conditioning has latent size {list(latent.shape[2:])} "
            f"(mask {list(generate.shape[2:])}), but the latent to sample is {list(latent_shape[2:])}; "
            f"use the latent output of the same TD_ImageToVideo node"
        )
    keep = (1.0 - generate).to(latent.device)
    return torch.cat([keep.expand(-1, MASK_CHANNELS, -1, -1, -1), latent], dim=1)
