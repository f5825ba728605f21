"""The decode memory model (vae_plan) against the tensor bytes the fast decode really keeps alive.

Real-size decodes (base width 96, bf16, 480p/720p latents) run on the meta device, so nothing is computed
or allocated; a dispatch mode adds up the bytes of every live tensor storage (a storage counts until it is
freed). The CUDA layout (channels-last) is used, and the three Triton kernels are replaced by stand-ins
that allocate what the kernels allocate (only their outputs); SDPA by one that allocates its output only
(the model budgets the scores separately, `ATTENTION_SCORE_BYTES`). bench/vae.py compares the same model
with CUDA's peak memory on the GPU.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from comfyui_turbodiffusion.wan_models import vae as vae_module
from comfyui_turbodiffusion.wan_models import vae_fast
from comfyui_turbodiffusion.wan_models.vae import WanVAE
from comfyui_turbodiffusion.wan_models.vae_fast import BufferedCausalCache, latent_chunks
from comfyui_turbodiffusion.wan_models.vae_plan import (
    ATTENTION_SCORE_BYTES,
    GIB,
    decode_working_bytes,
    plan_decode,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and not yet freed; `peak` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if (
                isinstance(tensor, torch.Tensor)
                and id(storage := tensor.untyped_storage()) not in self._tracked
            ):
                self._tracked.add(id(storage))
                self.live += storage.nbytes()
                weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def _norm_silu_stand_in(x, gamma, scale, out=None, bias=None):
    return torch.empty_like(x, memory_format=torch.channels_last_3d) if out is None else out


def _add_residual_stand_in(h, bias, residual):
    return h


def _attention_stand_in(q, k, v):
    return torch.empty_like(q)


@pytest.fixture
def meta_vae(monkeypatch) -> WanVAE:
    monkeypatch.setattr(vae_module, "memory_format_for", lambda device: torch.channels_last_3d)
    monkeypatch.setattr(vae_fast, "rms_norm_silu", _norm_silu_stand_in)
    monkeypatch.setattr(vae_fast, "add_bias_residual_", _add_residual_stand_in)
    monkeypatch.setattr(F, "scaled_dot_product_attention", _attention_stand_in)
    with torch.device("meta"):
        return WanVAE(96).to(torch.bfloat16).eval()


@pytest.mark.parametrize("size", [(60, 104), (90, 160)], ids=["480p", "720p"])
@pytest.mark.parametrize(
    ("frames_per_chunk", "frames_per_pass"), [(1, None), (2, None), (1, 1), (2, 2), (2, 4)]
)
def test_model_matches_the_live_bytes_of_the_decoder(meta_vae, size, frames_per_chunk, frames_per_pass):
    """Caches plus the largest activations, over the first three passes (the caches are full after the
    first): the model may not be below, nor more than 3% above (attention scores aside)."""
    latent = torch.empty(1, 16, 1 + 2 * frames_per_chunk, *size, dtype=torch.bfloat16, device="meta")
    plan = plan_decode(latent.shape, frames_per_chunk=frames_per_chunk, frames_per_pass=frames_per_pass)
    with torch.no_grad(), LiveBytes() as tracker:
        cache = BufferedCausalCache(torch.channels_last_3d)
        for start, stop in latent_chunks(latent.shape[2], frames_per_chunk):
            chunk = latent[:, :, start:stop].contiguous(memory_format=torch.channels_last_3d)
            meta_vae.decoder(chunk, cache, frames_per_pass)

    modelled = decode_working_bytes(plan, latent.shape, 96, 2) - ATTENTION_SCORE_BYTES
    assert tracker.peak <= modelled <= 1.03 * tracker.peak


@pytest.mark.parametrize(("size", "budget"), [((60, 104), 3.0), ((90, 160), 6.0)], ids=["480p", "720p"])
def test_a_whole_budget_decode_stays_within_the_budget(meta_vae, size, budget):
    """81 frames with the video on the device (the planner tiles): weights + live bytes <= budget."""
    latent = torch.empty(1, 16, 21, *size, device="meta")
    weights = sum(p.numel() * p.element_size() for p in meta_vae.parameters())

    with torch.no_grad(), LiveBytes() as tracker:
        video = meta_vae.decode(latent, vram_budget_gib=budget)

    assert video.shape == (1, 3, 81, 8 * size[0], 8 * size[1])
    assert meta_vae.decode_plan(latent.shape, vram_budget_gib=budget).tiled
    assert (weights + tracker.peak + ATTENTION_SCORE_BYTES) / GIB <= budget
