"""I2V image preprocessing against torchvision (TURBODIFFUSION.md §5.2) and the conditioning latent (§5.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_turbodiffusion.wan_models.i2v import (
    build_i2v_condition,
    image_size,
    image_to_uint8,
    preprocess_image,
    resize_uint8,
)
from PIL import Image
from pipeline_torchvision import import_transforms_v2

T = import_transforms_v2()
needs_torchvision = pytest.mark.skipif(T is None, reason="torchvision is not installed")

# (source width, source height) -> (target width, target height): down, up, mixed, identity.
RESIZES = [((97, 61), (64, 48)), ((40, 24), (96, 80)), ((200, 30), (48, 64)), ((64, 48), (64, 48))]


def _random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    smooth = rng.integers(0, 256, size=(height // 4 + 2, width // 4 + 2, channels)).astype(np.float64)
    blocky = np.kron(smooth, np.ones((4, 4, 1)))[:height, :width]
    noisy = blocky + rng.normal(0, 30, (height, width, channels))
    pixels = np.clip(noisy, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def _torchvision_reference(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The reference script's transform (wan2.2_i2v_infer.py), applied to the image converted to RGB."""
    pipeline = T.Compose(
        [
            T.ToImage(),
            T.Resize(size=(height, width), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )
    return pipeline(image.convert("RGB")).unsqueeze(0)


@needs_torchvision
@pytest.mark.parametrize(("source", "target"), RESIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_preprocessing_equals_torchvision_exactly(source, target, mode):
    image = _random_image(*source, mode=mode, seed=sum(source))
    ours = preprocess_image(image, *target)
    assert ours.shape == (1, 3, target[1], target[0]) and ours.dtype == torch.float32
    assert torch.equal(ours, _torchvision_reference(image, *target))


@needs_torchvision
@pytest.mark.parametrize(("source", "target"), RESIZES[:3])
def test_float_fallback_equals_torchvision_float_path(source, target, monkeypatch):
    """On CPUs without a vectorised uint8 kernel torchvision resizes in float32 and rounds; so do we."""
    from torchvision.transforms.v2.functional import _geometry

    monkeypatch.setattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: False)
    image = _random_image(*source, seed=3)
    reference = T.Resize(size=(target[1], target[0]), antialias=True)(T.ToImage()(image))
    ours = resize_uint8(image_to_uint8(image), target[1], target[0], native_uint8=False)
    assert torch.equal(ours, reference.as_subclass(torch.Tensor))


def test_comfyui_float_image_gives_the_same_pixels_as_pil():
    image = _random_image(40, 24, seed=5)
    uint8 = np.array(image)
    comfy_image = torch.from_numpy(uint8).float().div(255).unsqueeze(0)  # ComfyUI IMAGE [1, H, W, 3]
    assert torch.equal(image_to_uint8(comfy_image), image_to_uint8(image))
    assert torch.equal(image_to_uint8(uint8), image_to_uint8(image))
    assert image_size(comfy_image) == (40, 24)
    assert torch.equal(preprocess_image(comfy_image, 32, 16), preprocess_image(image, 32, 16))


def test_bad_images():
    with pytest.raises(ValueError, match="expected an image of shape"):
        image_to_uint8(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="integer images must be uint8"):
        image_to_uint8(np.zeros((8, 8, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="width must be a positive multiple of 16"):
        preprocess_image(_random_image(16, 16), 20, 16)


class RecordingVAE(torch.nn.Module):
    """Encodes by average-pooling (8x8 spatially, causal 1+4k frames) into 16 channels; records its input."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))
        self.seen: list[torch.Tensor] = []

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.seen.append(video.clone())
        first, rest = video[:, :, :1], video[:, :, 1:]
        b, c, f, h, w = rest.shape
        grouped = rest.reshape(b, c, f // 4, 4, h, w).mean(3) if f else rest
        frames = torch.cat([first, grouped], dim=2)
        pooled = torch.nn.functional.avg_pool3d(frames, (1, 8, 8))
        return torch.einsum("oc,bcthw->bothw", self.weight, pooled) + 0.5


def test_conditioning_latent_layout():
    vae = RecordingVAE()
    image = preprocess_image(_random_image(40, 24, seed=9), 32, 16)
    y = build_i2v_condition(vae, image, num_frames=9)
    assert y.shape == (1, 20, 3, 2, 4) and y.dtype == torch.float32
    (video,) = vae.seen
    assert video.shape == (1, 3, 9, 16, 32)
    assert torch.equal(video[:, :, 0], image) and torch.count_nonzero(video[:, :, 1:]) == 0
    expected_mask = torch.zeros(1, 4, 3, 2, 4)
    expected_mask[:, :, 0] = 1
    assert torch.equal(y[:, :4], expected_mask)
    assert torch.equal(y[:, 4:], vae.encode(video))


def test_conditioning_rejects_bad_frame_counts():
    with pytest.raises(ValueError, match="got 80; use 77 or 81"):
        build_i2v_condition(RecordingVAE(), torch.zeros(1, 3, 16, 16), num_frames=80)
