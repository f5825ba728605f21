"""WanVAE encode/decode, loaded from each file layout, against diffusers' AutoencoderKLWan (float32, CPU).

Frame counts 1, 5, 9 exercise the first-frame path, the 4-frame chunks and the causal caches; 32x48 a
non-square size. Tolerance 1e-5 (FORMATS.md section 6 measured <= 1.8e-6 between the references).
"""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.wan_models import load_vae
from vae_reference import (
    diffusers_vae,
    random_original_state_dict,
    reference_decode,
    reference_encode,
    write_vae_files,
)

BASE_DIM = 8
ATOL = 1e-5
SHAPES = [(1, 32, 32), (5, 32, 32), (9, 32, 32), (9, 32, 48)]


@pytest.fixture(scope="module")
def weights():
    state = random_original_state_dict(BASE_DIM, seed=0)
    return state, diffusers_vae(state, BASE_DIM)


@pytest.fixture(scope="module")
def files(weights, tmp_path_factory):
    state, reference = weights
    return write_vae_files(state, reference, tmp_path_factory.mktemp("vae_files"))


@pytest.fixture(scope="module")
def references(weights):
    """diffusers results per shape, computed once: (video, latent, reference latent, reference decode)."""
    _, reference = weights
    generator = torch.Generator().manual_seed(1)
    results = {}
    for frames, height, width in SHAPES:
        video = torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1
        latent = torch.randn(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8, generator=generator)
        results[frames, height, width] = (
            video,
            latent,
            reference_encode(reference, video),
            reference_decode(reference, latent),
        )
    return results


@pytest.mark.parametrize("layout", ["original_pth", "comfyui_safetensors", "diffusers_folder"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_encode_and_decode_match_diffusers(files, references, layout, shape):
    vae = load_vae(files[layout])
    video, latent, expected_latent, expected_video = references[shape]

    encoded = vae.encode(video)
    decoded = vae.decode(latent)

    assert encoded.dtype == torch.float32 and decoded.dtype == torch.float32
    assert encoded.shape == expected_latent.shape
    torch.testing.assert_close(encoded, expected_latent, atol=ATOL, rtol=0)
    assert decoded.shape == expected_video.shape == (1, 3, shape[0], shape[1], shape[2])
    torch.testing.assert_close(decoded, expected_video, atol=ATOL, rtol=0)


def test_other_base_width_and_batch_of_two(tmp_path):
    """base_dim 16 is read from the file; two batch members are processed independently."""
    state = random_original_state_dict(16, seed=2)
    reference = diffusers_vae(state, 16)
    torch.save(state, tmp_path / "vae16.pth")
    vae = load_vae(tmp_path / "vae16.pth")
    generator = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 5, 16, 24, generator=generator) * 2 - 1
    latent = torch.randn(2, 16, 3, 2, 3, generator=generator)

    assert vae.base_dim == 16
    torch.testing.assert_close(vae.encode(video), reference_encode(reference, video), atol=ATOL, rtol=0)
    torch.testing.assert_close(vae.decode(latent), reference_decode(reference, latent), atol=ATOL, rtol=0)


def test_decoded_video_is_clamped(weights, tmp_path):
    """Latents far outside the training range still decode to [-1, 1], as diffusers returns them."""
    state, reference = weights
    torch.save(state, tmp_path / "vae.pth")
    latent = 40 * torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))

    decoded = load_vae(tmp_path / "vae.pth").decode(latent)

    assert decoded.abs().max() == 1.0
    torch.testing.assert_close(decoded, reference_decode(reference, latent), atol=ATOL, rtol=0)


def test_bfloat16_runs_in_bfloat16_and_returns_float32(files, references):
    """TurboDiffusion's precision: weights, activations, mean and 1/std in bf16; results float32."""
    vae = load_vae(files["original_pth"], dtype=torch.bfloat16)
    video, latent, expected_latent, expected_video = references[5, 32, 32]
    mean, inv_std = vae.latent_stats()

    encoded = vae.encode(video)
    decoded = vae.decode(latent)

    assert vae.dtype == torch.bfloat16 and mean.dtype == inv_std.dtype == torch.bfloat16
    # 1/std is rounded to bf16 after dividing in bf16, as TurboDiffusion computes it.
    expected_inv_std = 1.0 / torch.tensor(2.8184, dtype=torch.bfloat16)
    assert inv_std.flatten()[0] == expected_inv_std
    assert encoded.dtype == torch.float32 and decoded.dtype == torch.float32
    assert (encoded - expected_latent).abs().max() < 0.05 * expected_latent.abs().max()
    assert (decoded - expected_video).abs().max() < 0.1 * expected_video.abs().max()
