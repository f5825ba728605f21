"""The fast decode and encode (vae_fast: several latent frames per pass, full-rate layers a few frames at a
time, buffered causal convolutions, the fused kernels' reference formulas on the CPU) against diffusers'
AutoencoderKLWan, which decodes one latent frame at a time, in float32 on the CPU; the VRAM-budget planner.

Every plan must give diffusers' result within 1e-5, in PyTorch's default layout and in the channels-last
layout the GPU path uses. Latent frame counts 1-4 are videos of 1, 5, 9 and 13 frames; 3x5 is non-square.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.wan_models import vae as vae_module
from comfyui_turbodiffusion.wan_models.vae import WanVAE
from comfyui_turbodiffusion.wan_models.vae_plan import GIB, estimate_decode_bytes
from vae_reference import diffusers_vae, random_original_state_dict, reference_decode, reference_encode

BASE_DIM = 8
ATOL = 1e-5
LATENT_SHAPES = [(1, 4, 4), (2, 4, 4), (3, 4, 4), (4, 3, 5)]  # latent frames, height, width
PLANS = [
    {"frames_per_chunk": 1},
    {"frames_per_chunk": 2},
    {"frames_per_chunk": 3, "frames_per_pass": 1},
    {"frames_per_chunk": 2, "frames_per_pass": 3},
    {"frames_per_chunk": 4, "frames_per_pass": 5},
]
LAYOUTS = ["default", "channels_last_3d"]


@pytest.fixture(scope="module")
def models():
    state = random_original_state_dict(BASE_DIM, seed=11)
    vae = WanVAE(BASE_DIM)
    vae.load_state_dict(state, strict=True)
    return vae.eval(), diffusers_vae(state, BASE_DIM)


@pytest.fixture
def layout(request, monkeypatch):
    """Run the fast path in the given layout (channels_last_3d is what it uses on CUDA)."""
    if request.param == "channels_last_3d":
        monkeypatch.setattr(vae_module, "memory_format_for", lambda device: torch.channels_last_3d)
    return request.param


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_frame_plan_decodes_as_diffusers_frame_by_frame(models, layout, shape):
    vae, reference = models
    latent = _random(1, 16, *shape, seed=sum(shape))
    expected = reference_decode(reference, latent)

    torch.testing.assert_close(vae.decode_reference(latent), expected, atol=ATOL, rtol=0)
    for plan in PLANS:
        decoded = vae.decode(latent, **plan)
        assert decoded.dtype == torch.float32 and decoded.shape == expected.shape
        torch.testing.assert_close(decoded, expected, atol=ATOL, rtol=0, msg=lambda m, p=plan: f"{p}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_every_chunking_encodes_as_diffusers(models, layout, frames):
    vae, reference = models
    video = _random(1, 3, frames, 24, 40, seed=frames).clamp(-1, 1)
    expected = reference_encode(reference, video)

    torch.testing.assert_close(vae.encode_reference(video), expected, atol=ATOL, rtol=0)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(vae.encode(video, frames_per_chunk=chunk), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_chunked_tiles_blend_like_diffusers_tiles(models, layout):
    """Tiles 4 x 6 latent px at columns [0, 6) and [2, 8): the 32 overlapping video px fade linearly."""
    vae, reference = models
    latent = _random(1, 16, 4, 4, 8, seed=21)
    fade_in = (torch.arange(32) + 0.5) / 32
    left_weight = torch.cat([torch.ones(16), 1 - fade_in])
    right_weight = torch.cat([fade_in, torch.ones(16)])
    left = reference_decode(reference, latent[..., 0:6])
    right = reference_decode(reference, latent[..., 2:8])
    expected = torch.zeros(1, 3, 13, 32, 64)
    expected[..., :48] += left * left_weight
    expected[..., 16:] += right * right_weight

    assert left.abs().max() < 1 and right.abs().max() < 1  # diffusers' clamp of each tile changes nothing
    tiled = vae.decode(latent, tile_size=(4, 6), tile_overlap=2, frames_per_chunk=2, frames_per_pass=3)

    assert vae.decode_plan(latent.shape, (4, 6), 2).describe().startswith("1x2 spatial tiles")
    torch.testing.assert_close(tiled, expected, atol=ATOL, rtol=0)


def test_callback_counts_latent_frames_per_pass(models):
    vae, _ = models
    calls = []

    vae.decode(_random(1, 16, 4, 2, 2, seed=3), frames_per_chunk=2, callback=lambda *c: calls.append(c))

    assert calls == [(1, 4), (3, 4), (4, 4)]  # frame 0 alone, then two at a time


@pytest.mark.parametrize(
    ("options", "message"),
    [({"frames_per_chunk": 0}, "frames_per_chunk"), ({"frames_per_pass": 0}, "frames_per_pass")],
)
def test_invalid_frame_counts_are_refused(models, options, message):
    with pytest.raises(ValueError, match=message):
        models[0].decode(torch.zeros(1, 16, 2, 2, 2), **options)
    with pytest.raises(ValueError, match="frames_per_chunk"):
        models[0].encode(torch.zeros(1, 3, 5, 16, 16), frames_per_chunk=0)


@pytest.fixture(scope="module")
def real_size_vae() -> WanVAE:
    """The released configuration (base width 96) in bf16, without memory: for planning only."""
    with torch.device("meta"):
        return WanVAE(96).to(torch.bfloat16)


def _peak(vae: WanVAE, plan, shape, output_on_device: bool) -> float:
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    return (estimate_decode_bytes(plan, shape, 96, 2, output_on_device) + weights) / GIB


@pytest.mark.parametrize(
    ("size", "budget", "output", "tiled"),
    [
        ((60, 104), 3.0, "cpu", False),  # 480p: exact, fewer frames per pass
        ((60, 104), 3.0, None, True),  # 480p with the video on the GPU: tiles
        ((90, 160), 6.0, "cpu", False),
        ((90, 160), 6.0, None, True),
    ],
)
def test_budget_plans_fit_the_budget_and_tile_only_when_needed(real_size_vae, size, budget, output, tiled):
    shape = (1, 16, 21, *size)
    plan = real_size_vae.decode_plan(shape, vram_budget_gib=budget, output_device=output)

    assert plan.tiled == tiled and not plan.autotune
    assert _peak(real_size_vae, plan, shape, output is None) <= budget
    if not tiled:  # an untiled plan needs fewer frames per pass than the fastest one
        assert plan.frames_per_pass is not None
        assert "untiled" in plan.describe()
    else:  # tiles only across the long side, overlapping by 8 latent px
        assert len(plan.rows) == 1 and len(plan.cols) == 2
        assert plan.cols[0][1] - plan.cols[1][0] >= 8
        assert plan.describe().startswith("1x2 spatial tiles")


def test_a_large_budget_takes_the_fastest_plan(real_size_vae):
    plan = real_size_vae.decode_plan((1, 16, 21, 60, 104), vram_budget_gib=100.0)

    assert not plan.tiled and plan.frames_per_chunk == 2 and plan.frames_per_pass is None


def test_a_too_small_budget_says_what_is_needed(real_size_vae):
    with pytest.raises(ValueError, match=r"0\.20 GiB is too small .* need [0-9.]+ GiB .*raise the budget"):
        real_size_vae.decode_plan((1, 16, 21, 90, 160), vram_budget_gib=0.2)


def test_a_budget_excludes_explicit_tiles(real_size_vae):
    with pytest.raises(ValueError, match="either vram_budget_gib .* or tile_size"):
        real_size_vae.decode_plan((1, 16, 21, 60, 104), tile_size=32, vram_budget_gib=3.0)
