"""generate_t2v / generate_i2v wiring with mock models: prompt -> context -> rCM sampling -> VAE -> frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_turbodiffusion.wan_models import generate_i2v, generate_t2v
from comfyui_turbodiffusion.wan_models.i2v import preprocess_image
from PIL import Image
from pipeline_mocks import TEXT_DIM, MockVelocity, spec_sample


class MockTextEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(
            torch.randn(256, TEXT_DIM, generator=torch.Generator().manual_seed(1))
        )
        self.prompts: list[list[str]] = []

    def encode(self, prompts):
        self.prompts.append(list(prompts))
        ids = torch.tensor([[ord(c) % 256 for c in p[:10]] for p in prompts])
        context = torch.zeros(len(prompts), 16, TEXT_DIM)
        context[:, : ids.shape[1]] = self.table[ids]
        return context.detach()


class MockVAE(torch.nn.Module):
    """Encode: pooled, causal 1+4k frames. Decode: upsampled, values beyond [-1, 1] so clamping matters."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.down = torch.nn.Parameter(torch.randn(16, 3, generator=gen))
        self.up = torch.nn.Parameter(torch.randn(3, 16, generator=gen))
        self.encoded: list[torch.Tensor] = []

    def encode(self, video):
        self.encoded.append(video)
        grouped = torch.cat([video[:, :, :1], video[:, :, 1::4]], dim=2)
        return torch.einsum("oc,bcthw->bothw", self.down, torch.nn.functional.avg_pool3d(grouped, (1, 8, 8)))

    def decode(self, latent):
        video = 1.5 * torch.tanh(torch.einsum("oc,bcthw->bothw", self.up, latent))
        first, rest = video[:, :, :1], video[:, :, 1:].repeat_interleave(4, dim=2)
        frames = torch.cat([first, rest], dim=2)
        return frames.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)


def _expected_frames(vae, latent):
    """§6.3: clamp to [-1, 1], (1 + v) / 2, samples side by side: (n c t h w) -> (t h (n w) c)."""
    with torch.no_grad():
        video = vae.decode(latent).clamp(-1, 1)
    unit = (1 + video) / 2
    return torch.cat(list(unit), dim=3).permute(1, 2, 3, 0)


def test_t2v_end_to_end_matches_the_spec_loop():
    dit, vae, encoder = MockVelocity(seed=4), MockVAE(), MockTextEncoder()
    result = generate_t2v(
        dit, vae, prompt="a cat", text_encoder=encoder, width=48, height=32, num_frames=9, seed=5, steps=3
    )
    assert encoder.prompts == [["a cat"]]
    context = MockTextEncoder().encode(["a cat"])
    expected, _, _ = spec_sample(
        MockVelocity(seed=4), None, context, (1, 16, 3, 4, 6), seed=5, steps=3, sigma_max=80.0, ode=False
    )
    assert torch.equal(result.latent, torch.from_numpy(expected))
    assert result.frames.shape == (9, 32, 48, 3) and result.frames.dtype == torch.float32
    assert torch.equal(result.frames, _expected_frames(vae, result.latent))
    assert result.frames.min() >= 0 and result.frames.max() <= 1 and (result.frames == 1).any()
    assert (result.width, result.height, result.num_frames, result.fps, result.seed) == (48, 32, 9, 16, 5)
    assert result.steps_per_model == {"model": 3}
    assert set(result.timings) == {"text_encoding", "sampling", "model_transfer", "vae_decoding", "total"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= result.timings["sampling"] + result.timings["vae_decoding"]


def test_t2v_precomputed_context_presets_and_samples_side_by_side():
    dit, vae = MockVelocity(seed=4), MockVAE()
    context = MockTextEncoder().encode(["x"])
    result = generate_t2v(
        dit, vae, context=context, resolution="512", aspect_ratio="16:9", num_frames=1, num_samples=2
    )
    assert "text_encoding" not in result.timings
    assert (result.width, result.height) == (640, 384)
    assert result.latent.shape == (2, 16, 1, 48, 80)
    assert result.frames.shape == (1, 384, 2 * 640, 3)
    assert torch.equal(result.frames, _expected_frames(vae, result.latent))


def test_t2v_same_seed_same_frames():
    kwargs = dict(context=MockTextEncoder().encode(["x"]), width=32, height=32, num_frames=5)
    a = generate_t2v(MockVelocity(seed=4), MockVAE(), seed=1, **kwargs)
    b = generate_t2v(MockVelocity(seed=4), MockVAE(), seed=1, **kwargs)
    c = generate_t2v(MockVelocity(seed=4), MockVAE(), seed=2, **kwargs)
    assert torch.equal(a.frames, b.frames) and not torch.equal(a.frames, c.frames)


def _image(width=40, height=24):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("steps", "high_runs"), [(1, 1), (2, 2), (3, 2), (4, 2)])
def test_i2v_end_to_end_matches_the_spec_loop(steps, high_runs):
    high, low = MockVelocity(seed=6, in_dim=36), MockVelocity(seed=7, in_dim=36)
    vae, encoder, image = MockVAE(), MockTextEncoder(), _image()
    result = generate_i2v(
        high,
        low,
        vae,
        image,
        prompt="a dog",
        text_encoder=encoder,
        width=32,
        height=16,
        num_frames=9,
        steps=steps,
        mode="ode",
        seed=3,
    )
    (video,) = vae.encoded
    assert torch.equal(video[:, :, 0], preprocess_image(image, 32, 16))
    assert torch.count_nonzero(video[:, :, 1:]) == 0
    y = torch.cat([torch.zeros(1, 4, 3, 2, 4), vae.encode(video)], dim=1)
    y[:, :4, 0] = 1
    expected, used, _ = spec_sample(
        MockVelocity(seed=6, in_dim=36),
        MockVelocity(seed=7, in_dim=36),
        MockTextEncoder().encode(["a dog"]),
        (1, 16, 3, 2, 4),
        seed=3,
        steps=steps,
        sigma_max=200.0,
        ode=True,
        y=y,
    )
    assert torch.equal(result.latent, torch.from_numpy(expected))
    assert result.steps_per_model.get("high_noise") == high_runs
    assert result.steps_per_model.get("low_noise", 0) == steps - high_runs
    assert result.frames.shape == (9, 16, 32, 3)
    stages = {
        "text_encoding",
        "vae_encoding",
        "sampling_high_noise",
        "model_transfer",
        "vae_decoding",
        "total",
    }
    assert stages <= set(result.timings)
    assert ("sampling_low_noise" in result.timings) == (steps > 2)


def test_i2v_adaptive_resolution_follows_the_image():
    high, low = MockVelocity(seed=6, in_dim=36), MockVelocity(seed=7, in_dim=36)
    context = MockTextEncoder().encode(["x"])
    result = generate_i2v(
        high,
        low,
        MockVAE(),
        _image(300, 100),
        context=context,
        resolution="512",
        aspect_ratio="1:1",
        adaptive_resolution=True,
        num_frames=1,
        steps=1,
    )
    assert (result.width, result.height) == (880, 288)  # sqrt(512² · 3) = 886.8, sqrt(512² / 3) = 295.6


def test_i2v_single_expert_runs_every_step():
    high = MockVelocity(seed=6, in_dim=36)
    result = generate_i2v(
        high,
        None,
        MockVAE(),
        _image(),
        context=MockTextEncoder().encode(["x"]),
        width=32,
        height=16,
        num_frames=5,
        steps=4,
    )
    assert result.steps_per_model == {"model": 4}


def test_pipeline_argument_errors():
    t2v, i2v = MockVelocity(seed=1), MockVelocity(seed=2, in_dim=36)
    context = MockTextEncoder().encode(["x"])
    with pytest.raises(ValueError, match="got 80; use 77 or 81"):
        generate_t2v(t2v, MockVAE(), context=context, num_frames=80)
    with pytest.raises(ValueError, match="give a text_encoder and a prompt, or a precomputed context"):
        generate_t2v(t2v, MockVAE(), prompt="x", width=32, height=32, num_frames=1)
    with pytest.raises(ValueError, match="give both width and height"):
        generate_t2v(t2v, MockVAE(), context=context, width=32, num_frames=1)
    with pytest.raises(
        ValueError, match="DiT has in_dim 36, expected 16; a Wan2.2 I2V expert runs with generate_i2v"
    ):
        generate_t2v(i2v, MockVAE(), context=context, num_frames=1)
    with pytest.raises(ValueError, match="low-noise expert has in_dim 16, expected 36"):
        generate_i2v(i2v, t2v, MockVAE(), _image(), context=context, num_frames=1)
    with pytest.raises(ValueError, match="steps must be 1, 2, 3 or 4"):
        generate_t2v(t2v, MockVAE(), context=context, width=32, height=32, num_frames=1, steps=5)
    with pytest.raises(ValueError, match="sigma_max must be a positive"):
        generate_i2v(i2v, None, MockVAE(), _image(), context=context, sigma_max=-1)
    with pytest.raises(ValueError, match="do not pass them"):
        generate_i2v(i2v, None, MockVAE(), _image(), context=context, adaptive_resolution=True, width=32)
