"""Spatially tiled decoding: tile placement and seam blending against a blend written out here, with the
tiles decoded by diffusers; closeness to untiled decoding; the progress callback.

Tiled decoding is an approximation: tiles do not see each other (the decoder's convolutions reach far
beyond any overlap at these sizes, and its mid-block attention is global), so it is compared with untiled
decoding only within a bound. Measured at base_dim 8 with three random weight sets (video values up to
0.6 - 1): max abs difference 0.26 - 0.46, mean 0.023 - 0.055, for 4- to 8-latent-pixel tiles with overlaps
of 1 - 2. The test allows max 0.75 and mean 0.1; the exact checks are the two blend tests.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_turbodiffusion.wan_models.vae import WanVAE, plan_decode
from vae_reference import diffusers_vae, random_original_state_dict, reference_decode

BASE_DIM = 8
ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
    state = random_original_state_dict(BASE_DIM, seed=5)
    vae = WanVAE(BASE_DIM)
    vae.load_state_dict(state, strict=True)
    return vae.eval(), diffusers_vae(state, BASE_DIM)


def _latent(*shape: int, seed: int = 6) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _two_tile_ramps() -> tuple[torch.Tensor, torch.Tensor]:
    """Weights over 48 px of tiles at latent [0, 4) and [2, 6): the 16 overlapping px fade linearly."""
    fade_in = (torch.arange(16) + 0.5) / 16
    first = torch.cat([torch.ones(16), 1 - fade_in, torch.zeros(16)])
    second = torch.cat([torch.zeros(16), fade_in, torch.ones(16)])
    return first, second


def test_two_tiles_blend_linearly_across_the_seam(models):
    vae, reference = models
    latent = _latent(1, 16, 3, 4, 6)
    left = reference_decode(reference, latent[..., 0:4])
    right = reference_decode(reference, latent[..., 2:6])
    first, second = _two_tile_ramps()
    expected = torch.zeros(1, 3, 9, 32, 48)
    expected[..., 0:32] += left * first[0:32]
    expected[..., 16:48] += right * second[16:48]

    assert left.abs().max() < 1 and right.abs().max() < 1  # clamping each tile first changes nothing
    tiled = vae.decode(latent, tile_size=4, tile_overlap=2)

    torch.testing.assert_close(tiled, expected, atol=ATOL, rtol=0)


def test_tile_grid_blends_rows_and_columns(models):
    vae, reference = models
    latent = _latent(1, 16, 2, 6, 6, seed=7)
    ramps = _two_tile_ramps()
    expected = torch.zeros(1, 3, 5, 48, 48)
    for row, row_ramp in zip((0, 2), ramps):
        for col, col_ramp in zip((0, 2), ramps):
            tile = reference_decode(reference, latent[..., row : row + 4, col : col + 4])
            assert tile.abs().max() < 1
            weight = row_ramp[:, None] * col_ramp[None, :]
            expected[..., row * 8 : row * 8 + 32, col * 8 : col * 8 + 32] += (
                tile * weight[row * 8 : row * 8 + 32, col * 8 : col * 8 + 32]
            )

    tiled = vae.decode(latent, tile_size=4, tile_overlap=2)

    torch.testing.assert_close(tiled, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("shape", "tile_size", "tile_overlap"),
    [((1, 16, 3, 4, 6), 4, 2), ((1, 16, 2, 8, 12), 6, 2), ((1, 16, 2, 8, 8), 4, 1)],
)
def test_tiled_decode_stays_close_to_untiled(models, shape, tile_size, tile_overlap):
    vae, _ = models
    latent = _latent(*shape, seed=8)

    untiled = vae.decode(latent)
    tiled = vae.decode(latent, tile_size=tile_size, tile_overlap=tile_overlap)

    difference = (tiled - untiled).abs()
    assert plan_decode(shape, tile_size, tile_overlap).tiled
    assert difference.max() < 0.75
    assert difference.mean() < 0.1


def test_a_tile_as_large_as_the_latent_is_untiled_decoding(models):
    vae, _ = models
    latent = _latent(1, 16, 2, 4, 6, seed=9)
    plan = plan_decode(latent.shape, tile_size=6)

    assert not plan.tiled and "untiled" in plan.describe()
    assert torch.equal(vae.decode(latent, tile_size=6), vae.decode(latent))


def test_plan_spreads_tiles_evenly_with_at_least_the_overlap():
    plan = plan_decode((1, 16, 21, 90, 160), tile_size=32, tile_overlap=8)

    # 4 rows: 3 tiles of 32 with overlaps >= 8 cover at most 32 + 2 * 24 = 80 < 90 px.
    assert plan.rows == ((0, 32), (19, 51), (39, 71), (58, 90))
    assert len(plan.cols) == 7
    for ranges, length in ((plan.rows, 90), (plan.cols, 160)):
        assert ranges[0][0] == 0 and ranges[-1][1] == length
        assert all(end - start == 32 for start, end in ranges)
        assert all(previous[1] - current[0] >= 8 for previous, current in zip(ranges, ranges[1:]))
    assert plan.describe().startswith("4x7 spatial tiles")


@pytest.mark.parametrize(("tile_size", "tile_overlap"), [(0, 0), (4, 4), (4, -1)])
def test_invalid_tiling_is_refused(tile_size, tile_overlap):
    with pytest.raises(ValueError, match="tile_overlap"):
        plan_decode((1, 16, 2, 8, 8), tile_size, tile_overlap)


def test_callback_reports_every_latent_frame_of_every_tile(models):
    vae, _ = models
    latent = _latent(1, 16, 3, 4, 6, seed=10)
    untiled_calls, tiled_calls = [], []

    vae.decode(latent, callback=lambda done, total: untiled_calls.append((done, total)))
    vae.decode(
        latent, tile_size=4, tile_overlap=2, callback=lambda done, total: tiled_calls.append((done, total))
    )

    assert untiled_calls == [(1, 3), (2, 3), (3, 3)]
    assert tiled_calls == [(done, 6) for done in range(1, 7)]
