"""Resolution presets, adaptive I2V resolution and frame counts (TURBODIFFUSION.md §5.1, §6)."""

from __future__ import annotations

import numpy as np
import pytest
from comfyui_turbodiffusion.wan_models.resolution import (
    FPS,
    adaptive_size,
    latent_shape,
    preset_size,
    validate_num_frames,
    validate_size,
)

# TURBODIFFUSION.md §6.1, (width, height) per column 1:1, 4:3, 3:4, 16:9, 9:16.
SPEC_TABLE = {
    "720": ["960x960", "960x704", "704x960", "1280x704", "704x1280"],
    "512": ["512x512", "640x512", "512x640", "640x384", "384x640"],
    "480": ["480x480", "640x480", "480x640", "768x432", "432x768"],
    "480p": ["640x640", "640x480", "480x640", "832x480", "480x832"],
    "720p": ["960x960", "960x720", "720x960", "1280x720", "720x1280"],
}
COLUMNS = ["1:1", "4:3", "3:4", "16:9", "9:16"]


@pytest.mark.parametrize("resolution", list(SPEC_TABLE))
@pytest.mark.parametrize("column", range(5))
def test_presets_match_spec_table(resolution, column):
    width, height = preset_size(resolution, COLUMNS[column])
    assert f"{width}x{height}" == SPEC_TABLE[resolution][column]
    assert width % 16 == 0 and height % 16 == 0


def test_defaults_and_fps():
    assert preset_size() == (832, 480)
    assert FPS == 16


def test_unknown_preset_names():
    with pytest.raises(ValueError, match="'1080p'; choose one of 720, 512, 480, 480p, 720p"):
        preset_size("1080p")
    with pytest.raises(ValueError, match="unknown aspect ratio '21:9'"):
        preset_size("480p", "21:9")


def _reference_adaptive(image_w, image_h, resolution, aspect):
    """§5.1 as the reference script computes it: numpy float64 square roots, Python round()."""
    base_w, base_h = SPEC_TABLE[resolution][COLUMNS.index(aspect)].split("x")
    area = int(base_w) * int(base_h)
    ratio = image_h / image_w
    return round(np.sqrt(area / ratio) / 16) * 16, round(np.sqrt(area * ratio) / 16) * 16


def test_adaptive_square_image_keeps_the_area():
    assert adaptive_size(512, 512, "720p", "16:9") == (960, 960)


def test_adaptive_rounds_half_to_even():
    # sqrt(1280*720 * 9409/14400) = 776 = 48.5 * 16 exactly: half-to-even gives 48 (768), half-up 49.
    assert adaptive_size(14400, 9409, "720p", "16:9")[1] == 768


def test_adaptive_matches_reference_formula_on_many_sizes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = (int(v) for v in rng.integers(16, 5000, size=2))
        resolution = ["480p", "720p", "512"][int(rng.integers(3))]
        aspect = COLUMNS[int(rng.integers(5))]
        assert adaptive_size(w, h, resolution, aspect) == _reference_adaptive(w, h, resolution, aspect)


def test_adaptive_rejects_degenerate_images():
    with pytest.raises(ValueError, match="image size must be positive"):
        adaptive_size(0, 10)
    with pytest.raises(ValueError, match="too elongated"):
        adaptive_size(100000, 1, "480p", "16:9")


@pytest.mark.parametrize("frames", [1, 5, 77, 81, 121])
def test_valid_frame_counts(frames):
    assert validate_num_frames(frames) == frames


@pytest.mark.parametrize(("frames", "hint"), [(80, "use 77 or 81"), (2, "use 1 or 5"), (83, "use 81 or 85")])
def test_frame_count_not_4n_plus_1(frames, hint):
    with pytest.raises(ValueError, match=f"num_frames must have the form 4n\\+1.*got {frames}; {hint}"):
        validate_num_frames(frames)


@pytest.mark.parametrize("frames", [0, -3, 81.0, True])
def test_frame_count_not_a_positive_int(frames):
    with pytest.raises(ValueError, match="positive integer of the form 4n\\+1"):
        validate_num_frames(frames)


def test_latent_shapes_of_the_spec_examples():
    assert latent_shape(832, 480, 81) == (1, 16, 21, 60, 104)
    assert latent_shape(1280, 720, 81, batch=2) == (2, 16, 21, 90, 160)


def test_custom_sizes_must_be_multiples_of_16():
    assert validate_size(64, 48) == (64, 48)
    with pytest.raises(ValueError, match="width must be a positive multiple of 16.*got 830; use 832"):
        validate_size(830, 480)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        validate_size(832, 0)
