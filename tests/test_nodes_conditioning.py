"""LATENT and CONDITIONING conventions of the nodes, and the latent / I2V nodes, in-process on ComfyUI's CPU.

The expected values are written from FORMATS.md §2.2 (the raw VAE mean is what ComfyUI's LATENT holds) and
from the layout of core WanImageToVideo's conditioning (`concat_latent_image` raw, `concat_mask` 0 on given
frames), with the 16 Wan constants taken from the spec (tests/vae_reference.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from comfy_inprocess import import_comfy_and_nodes
from vae_reference import latent_stats


@pytest.fixture(scope="module")
def nodes():
    return import_comfy_and_nodes()[1]


def test_latent_holds_the_raw_vae_mean(nodes):
    from comfyui_turbodiffusion.nodes.comfy_latent import from_comfy_latent, to_comfy_latent

    mean, std = latent_stats()
    normalised = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    latent = to_comfy_latent(normalised)
    torch.testing.assert_close(latent["samples"], normalised * std + mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_comfy_latent(latent), normalised, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Wan video latent"):
        from_comfy_latent({"samples": torch.zeros(1, 4, 64, 64)})


def test_core_wan_image_to_video_conditioning_becomes_the_dit_condition(nodes):
    from comfyui_turbodiffusion.nodes.comfy_conditioning import start_image_condition, with_start_image

    mean, std = latent_stats()
    raw = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 1, 3, 6, 8)
    mask[:, :, 0] = 0.0  # core WanImageToVideo: 0 where the start image is given
    y = start_image_condition({"concat_latent_image": raw, "concat_mask": mask}, (1, 16, 3, 6, 8), "test")
    assert y.shape == (1, 20, 3, 6, 8)
    assert torch.equal(y[:, :4, 0], torch.ones(1, 4, 6, 8)) and not y[:, :4, 1:].any()
    torch.testing.assert_close(y[:, 4:], (raw - mean) / std, rtol=1e-5, atol=1e-5)

    written = with_start_image([[torch.zeros(1, 512, 64), {"keep": 1}]], y)
    options = written[0][1]
    assert options["keep"] == 1
    torch.testing.assert_close(options["concat_latent_image"], raw, rtol=1e-5, atol=1e-5)
    assert torch.equal(options["concat_mask"], mask)
    assert start_image_condition({}, (1, 16, 3, 6, 8), "test") is None
    with pytest.raises(ValueError, match="same TD_ImageToVideo"):
        start_image_condition({"concat_latent_image": raw}, (1, 16, 5, 6, 8), "test")


def test_empty_video_latent_follows_the_presets(nodes):
    node = nodes.NODE_CLASS_MAPPINGS["TD_EmptyVideoLatent"]()
    (latent,) = node.create("480p", "16:9", 81, 1)
    assert latent["samples"].shape == (1, 16, 21, 60, 104)  # 832x480, 21 latent frames
    (latent,) = node.create("720p", "9:16", 5, 2, width=64, height=48)
    assert latent["samples"].shape == (2, 16, 2, 6, 8)
    with pytest.raises(ValueError, match="4n\\+1"):
        node.create("480p", "16:9", 80, 1)


def test_image_to_video_adaptive_size_and_outputs(nodes, tmp_path):
    from comfy_tiny_models import VAE_BASE_DIM
    from comfyui_turbodiffusion.nodes.model_patchers import wrap_module
    from comfyui_turbodiffusion.wan_models import load_vae
    from vae_reference import random_original_state_dict

    torch.save(random_original_state_dict(VAE_BASE_DIM, seed=2), tmp_path / "vae.pth")
    vae = wrap_module(
        load_vae(tmp_path / "vae.pth", dtype=torch.float32),
        torch.device("cpu"),
        torch.device("cpu"),
        "vae.pth",
        "vae",
    )
    image = torch.rand(1, 72, 96, 3, generator=torch.Generator().manual_seed(3))
    positive = [[torch.zeros(1, 512, 64), {}]]
    node = nodes.NODE_CLASS_MAPPINGS["TD_ImageToVideo"]()

    conditioning, latent = node.encode(vae, positive, image, "480", "1:1", False, 5, width=64, height=48)
    assert latent["samples"].shape == (1, 16, 2, 6, 8)
    assert conditioning[0][1]["concat_latent_image"].shape == (1, 16, 2, 6, 8)

    # TURBODIFFUSION.md §5.1 for a 96x72 image at the "480" 1:1 preset (480x480).
    area, ratio = 480 * 480, 72 / 96
    height = round(math.sqrt(area * ratio) / 16) * 16
    width = round(math.sqrt(area / ratio) / 16) * 16
    _, latent = node.encode(vae, positive, image, "480", "1:1", True, 1)
    assert latent["samples"].shape == (1, 16, 1, height // 8, width // 8)
