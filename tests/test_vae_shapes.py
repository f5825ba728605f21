"""Input validation of WanVAE: frame counts 4n+1 and sizes multiple of 8 for encode, latent shape for decode.

The reference implementations silently drop trailing frames or crash for other counts (FORMATS.md 2.2), so
the errors name the valid counts or sizes to use. Checks run before any computation.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.wan_models.vae import WanVAE


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return WanVAE(base_dim=8).eval()


@pytest.mark.parametrize(
    ("frames", "advice"),
    [(2, "use 1 or 5"), (4, "use 1 or 5"), (8, "use 5 or 9"), (80, "use 77 or 81"), (0, "use 1")],
)
def test_frame_counts_other_than_4n_plus_1_name_the_nearest_valid_counts(vae, frames, advice):
    with pytest.raises(ValueError, match=rf"^{frames} frames cannot be encoded: .*4n\+1.*{advice}$"):
        vae.encode(torch.zeros(1, 3, frames, 8, 8))


@pytest.mark.parametrize(
    ("height", "width", "advice"),
    [
        (30, 32, "height 30 is not a multiple of 8; resize or crop it to 24 or 32"),
        (32, 4, "width 4 .* to 8$"),
    ],
)
def test_sizes_not_multiple_of_8_name_the_size_to_use(vae, height, width, advice):
    with pytest.raises(ValueError, match=advice):
        vae.encode(torch.zeros(1, 3, 1, height, width))


@pytest.mark.parametrize("shape", [(1, 4, 5, 8, 8), (3, 5, 8, 8)])
def test_video_must_be_rgb_b_c_f_h_w(vae, shape):
    with pytest.raises(ValueError, match=r"\[B, 3, frames, height, width\]"):
        vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 48, 2, 4, 4), (16, 2, 4, 4), (1, 16, 0, 4, 4)])
def test_latent_must_have_16_channels_and_frames(vae, shape):
    with pytest.raises(ValueError, match=r"\[B, 16, frames, height, width\]"):
        vae.decode(torch.zeros(shape))


@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (5, 2), (13, 4)])
def test_output_sizes(vae, frames, latent_frames):
    latent = vae.encode(torch.zeros(1, 3, frames, 16, 24))

    assert latent.shape == (1, 16, latent_frames, 2, 3)
    assert vae.decode(latent).shape == (1, 3, frames, 16, 24)
