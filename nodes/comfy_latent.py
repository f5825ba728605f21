"""ComfyUI's LATENT convention for Wan latents, at the pack's edges.

ComfyUI keeps the raw Wan 2.1 VAE posterior mean in LATENT["samples"] and normalises it with the Wan21 latent
format only when sampling (FORMATS.md section 2.2). Our sampler and VAE work on the normalised latent
(z - mean) / std, so the nodes convert on the way out and on the way in. That keeps core VAEDecode /
VAEEncode with the Wan VAE interchangeable with ours.
"""

from __future__ import annotations

import torch
from comfy import latent_formats


def to_comfy_latent(normalised: torch.Tensor) -> dict:
    """A LATENT dict holding the raw VAE mean for a normalised [B, 16, T, H, W] latent."""
    return {"samples": latent_formats.Wan21().process_out(normalised.float())}


def from_comfy_latent(latent: dict) -> torch.Tensor:
    """The normalised [B, 16, T, H, W] latent of a LATENT dict (raw VAE mean)."""
    samples = latent["samples"]
    if samples.ndim != 5 or samples.shape[1] != 16:
        raise ValueError(
            f"expected a Wan video latent [batch, 16, frames, height/8, width/8], got shape "
            f"{list(samples.shape)}; create it with TD_EmptyVideoLatent, TD_ImageToVideo or VAEEncode with "
            f"the Wan 2.1 VAE"
        )
    return latent_formats.Wan21().process_in(samples.float())
