"""Sampling and generation with tiny random-weight models written in the real checkpoint formats.

The DiTs are diffusers `WanTransformer3DModel`s written as TurboDiffusion `.pth` files and read back with
`load_dit`; the VAE is a base-8 Wan VAE in `Wan2.1_VAE.pth` layout; the text encoder a tiny umT5 in
ComfyUI's safetensors layout with its tokenizer inside.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_turbodiffusion.wan_models import generate_i2v, generate_t2v, load_dit, pipeline, rcm_sample
from comfyui_turbodiffusion.wan_models.sampler import SamplingStats
from dit_reference import (
    TINY,
    DiffusersNetwork,
    make_diffusers_model,
    to_original_layout,
    to_turbodiffusion_layout,
)
from PIL import Image
from pipeline_mocks import spec_sample
from text_encoder_fixtures import make_tiny_umt5, tokenizer_model_bytes, write_comfy_safetensors
from vae_reference import random_original_state_dict

SHAPE = (2, 16, 2, 4, 6)  # two samples, 5 frames of 48x32 pixels
HIGH_SEED, LOW_SEED, T2V_SEED = 11, 12, 10


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dits")
    files, references = {}, {}
    for name, in_channels, seed in (("t2v", 16, T2V_SEED), ("high", 36, HIGH_SEED), ("low", 36, LOW_SEED)):
        model = make_diffusers_model(in_channels=in_channels, seed=seed)
        original = to_original_layout(model.state_dict())
        files[name] = folder / f"TurboWan-tiny-{name}.pth"
        torch.save(to_turbodiffusion_layout(original, seed=seed), files[name])
        references[name] = DiffusersNetwork(model)
    return files, references


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from comfyui_turbodiffusion.wan_models import load_vae

    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(random_original_state_dict(base_dim=8, seed=3), path)
    return load_vae(path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    from comfyui_turbodiffusion.wan_models import load_text_encoder

    path = tmp_path_factory.mktemp("te") / "umt5_xxl_fp16.safetensors"
    write_comfy_safetensors(path, make_tiny_umt5(seed=4), torch.float32, spiece=tokenizer_model_bytes())
    return load_text_encoder(path, device="cpu", dtype=torch.float32)


def _context(batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(8)
    context = torch.zeros(batch, 512, TINY["text_dim"])
    context[:, :9] = torch.randn(batch, 9, TINY["text_dim"], generator=generator)
    return context


def _condition() -> torch.Tensor:
    generator = torch.Generator().manual_seed(9)
    y = torch.zeros(1, 20, *SHAPE[2:])
    y[:, :4, 0] = 1
    y[:, 4:] = torch.randn(1, 16, *SHAPE[2:], generator=generator)
    return y


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_t2v_sampling_with_a_loaded_dit(dit_files, steps, mode):
    files, references = dit_files
    model = load_dit(files["t2v"], dtype=torch.float32)
    out = rcm_sample(model, _context(), SHAPE, seed=21, steps=steps, mode=mode)
    options = dict(seed=21, steps=steps, sigma_max=80.0, ode=mode == "ode")
    same_network, _, _ = spec_sample(
        load_dit(files["t2v"], dtype=torch.float32), None, _context(), SHAPE, **options
    )
    assert torch.equal(out, torch.from_numpy(same_network))
    # diffusers differs from the TurboDiffusion numerics by ~1e-5 per call (float32 vs float64 sinusoid);
    # measured up to 2.6e-5 on outputs of magnitude ~5 after 1-4 steps.
    diffusers_loop, _, _ = spec_sample(references["t2v"], None, _context(), SHAPE, **options)
    np.testing.assert_allclose(out.numpy(), diffusers_loop, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize(("steps", "high_runs"), [(1, 1), (2, 2), (3, 2), (4, 2)])
def test_i2v_sampling_with_loaded_experts(dit_files, steps, high_runs, mode):
    files, references = dit_files
    high, low = load_dit(files["high"], dtype=torch.float32), load_dit(files["low"], dtype=torch.float32)
    stats = SamplingStats()
    out = rcm_sample(
        high,
        _context(),
        SHAPE,
        seed=22,
        steps=steps,
        sigma_max=200.0,
        mode=mode,
        y=_condition(),
        low_noise_model=low,
        stats=stats,
    )
    assert stats.steps_per_model["high_noise"] == high_runs
    assert stats.steps_per_model.get("low_noise", 0) == steps - high_runs
    options = dict(seed=22, steps=steps, sigma_max=200.0, ode=mode == "ode", y=_condition())
    same_network, used, _ = spec_sample(
        load_dit(files["high"], dtype=torch.float32),
        load_dit(files["low"], dtype=torch.float32),
        _context(),
        SHAPE,
        **options,
    )
    assert used == stats.step_models
    assert torch.equal(out, torch.from_numpy(same_network))
    diffusers_loop, _, _ = spec_sample(references["high"], references["low"], _context(), SHAPE, **options)
    np.testing.assert_allclose(out.numpy(), diffusers_loop, rtol=0, atol=1e-4)


def test_bf16_experts_see_bf16_inputs_and_match_the_spec_loop(dit_files):
    files, _ = dit_files
    high, low = load_dit(files["high"], dtype=torch.bfloat16), load_dit(files["low"], dtype=torch.bfloat16)
    out = rcm_sample(high, _context(), SHAPE, seed=5, sigma_max=200.0, y=_condition(), low_noise_model=low)
    expected, _, _ = spec_sample(
        load_dit(files["high"], dtype=torch.bfloat16),
        load_dit(files["low"], dtype=torch.bfloat16),
        _context(),
        SHAPE,
        seed=5,
        steps=4,
        sigma_max=200.0,
        ode=False,
        y=_condition(),
    )
    assert torch.equal(out, torch.from_numpy(expected))


def test_generate_t2v_end_to_end(dit_files, vae, text_encoder):
    files, _ = dit_files
    dit = load_dit(files["t2v"], dtype=torch.float32)
    options = dict(prompt="A red fox runs through a snowy forest at dawn.", text_encoder=text_encoder)
    options.update(width=48, height=32, num_frames=5, steps=2)
    first = generate_t2v(dit, vae, seed=1, **options)
    again = generate_t2v(dit, vae, seed=1, **options)
    other = generate_t2v(dit, vae, seed=2, **options)
    assert first.frames.shape == (5, 32, 48, 3) and first.frames.dtype == torch.float32
    assert first.frames.min() >= 0 and first.frames.max() <= 1
    assert torch.equal(first.frames, again.frames)
    assert not torch.equal(first.frames, other.frames)
    assert first.latent.shape == (1, 16, 2, 4, 6)
    assert {"text_encoding", "sampling", "vae_decoding", "total"} <= set(first.timings)
    with torch.no_grad():
        decoded = vae.decode(first.latent)
    assert torch.equal(first.frames, ((1 + decoded[0].clamp(-1, 1)) / 2).permute(1, 2, 3, 0))


def test_generate_i2v_end_to_end(dit_files, vae):
    files, _ = dit_files
    high, low = load_dit(files["high"], dtype=torch.float32), load_dit(files["low"], dtype=torch.float32)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    options = dict(context=_context(), width=32, height=16, num_frames=5, steps=4)
    first = generate_i2v(high, low, vae, image, seed=3, **options)
    again = generate_i2v(high, low, vae, image, seed=3, **options)
    assert first.frames.shape == (5, 16, 32, 3)
    assert torch.equal(first.frames, again.frames)
    assert first.steps_per_model == {"high_noise": 2, "low_noise": 2}
    stages = {"vae_encoding", "sampling_high_noise", "sampling_low_noise", "model_transfer", "vae_decoding"}
    assert stages <= set(first.timings)


def test_attention_override_is_for_one_run_only(dit_files, vae, monkeypatch):
    files, _ = dit_files
    dit = load_dit(files["t2v"], dtype=torch.float32)
    load_time_attention = dit.attention.self_attention
    seen = []

    def spy(*args, **kwargs):
        seen.append(True)
        return load_time_attention(*args, **kwargs)

    monkeypatch.setattr(pipeline, "make_self_attention", lambda name, sla_topk: spy)
    generate_t2v(dit, vae, context=_context(), width=32, height=32, num_frames=1, steps=1, attention="sdpa")
    assert seen and dit.attention.self_attention is load_time_attention


def test_sla_attention_for_one_run(dit_files, vae):
    files, _ = dit_files
    dit = load_dit(files["t2v"], dtype=torch.float32)
    options = dict(context=_context(), width=32, height=32, num_frames=1, steps=1)
    dense = generate_t2v(dit, vae, **options)
    sparse = generate_t2v(dit, vae, attention="sla", sla_topk=0.5, **options)
    assert sparse.frames.shape == dense.frames.shape
    assert not torch.equal(sparse.frames, dense.frames)
    assert torch.equal(generate_t2v(dit, vae, **options).frames, dense.frames)
