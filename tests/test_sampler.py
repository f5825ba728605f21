"""rCM sampler against the spec-derived reference loop in pipeline_mocks (TURBODIFFUSION.md §4, §5.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_turbodiffusion.wan_models import i2v, rcm_sample, rcm_time_grid
from comfyui_turbodiffusion.wan_models.i2v import ExpertSwitch
from comfyui_turbodiffusion.wan_models.sampler import SamplingStats
from pipeline_mocks import TEXT_DIM, MockVelocity, spec_sample, spec_time_grid, spec_timestep

SHAPE = (2, 16, 3, 4, 6)


def _context(batch: int = 1, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(batch, 12, TEXT_DIM)
    ctx[:, :5] = torch.randn(batch, 5, TEXT_DIM, generator=gen)
    return ctx


def _condition(seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = torch.zeros(1, 20, *SHAPE[2:])
    y[:, :4, 0] = 1.0
    y[:, 4:] = torch.randn(1, 16, *SHAPE[2:], generator=gen)
    return y


# Values from the spec tables, given to 10 decimals there.
GRID_T2V = [0.9876543210, 0.9337810614, 0.8528953948, 0.6089790492]
GRID_I2V_FIRST = 0.9950248756


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("sigma_max", [80.0, 200.0])
def test_time_grid_matches_spec_table(steps, sigma_max):
    grid = rcm_time_grid(steps, sigma_max)
    assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
    expected = [GRID_T2V[0] if sigma_max == 80 else GRID_I2V_FIRST, *GRID_T2V[1:steps], 0.0]
    np.testing.assert_allclose(grid.numpy(), expected, rtol=0, atol=1e-10)
    assert grid.tolist() == spec_time_grid(steps, sigma_max)


@pytest.mark.parametrize(
    ("sigma_max", "expected"),
    [(80.0, [988, 932, 852, 608]), (200.0, [996, 932, 852, 608]), (1600.0, [1000, 932, 852, 608])],
)
def test_network_sees_bf16_rounded_timesteps(sigma_max, expected):
    model = MockVelocity(seed=1)
    stats = SamplingStats()
    rcm_sample(model, _context(), (1, 16, 1, 2, 2), sigma_max=sigma_max, stats=stats)
    assert stats.timesteps == expected
    seen = [call["t"].tolist() for call in model.calls]
    assert seen == [[float(v)] for v in expected]
    assert [spec_timestep(t) for t in spec_time_grid(4, sigma_max)[:-1]] == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_t2v_sampling_is_bit_exact_with_spec_loop(steps, mode, dtype):
    model = MockVelocity(seed=11, dtype=dtype)
    context = _context()
    out = rcm_sample(model, context, SHAPE, seed=123, steps=steps, sigma_max=80.0, mode=mode)
    reference = MockVelocity(seed=11, dtype=dtype)
    expected, used, _ = spec_sample(
        reference, None, context, SHAPE, seed=123, steps=steps, sigma_max=80.0, ode=mode == "ode"
    )
    assert out.dtype == torch.float32 and out.shape == SHAPE
    assert torch.equal(out, torch.from_numpy(expected))
    assert used == ["model"] * steps
    assert len(model.calls) == steps
    for call, ref_call in zip(model.calls, reference.calls):
        assert call["x_dtype"] == dtype
        assert call["context"].dtype == dtype and call["context"].shape[0] == SHAPE[0]
        assert call["t"].dtype == torch.float32 and torch.equal(call["t"], ref_call["t"])


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_float64_state_is_bit_exact_at_every_step(steps, mode):
    """With a float64 network the input of every call is the sampler's float64 state, bit for bit."""
    recorded: list[torch.Tensor] = []

    class Recording(MockVelocity):
        def forward(self, x, t, context, y=None):
            recorded.append(x.clone())
            return super().forward(x, t, context, y)

    model = Recording(seed=5, dtype=torch.float64)
    rcm_sample(model, _context(), SHAPE, seed=9, steps=steps, mode=mode)
    _, _, states = spec_sample(
        MockVelocity(seed=5, dtype=torch.float64),
        None,
        _context(),
        SHAPE,
        seed=9,
        steps=steps,
        sigma_max=80.0,
        ode=mode == "ode",
    )
    assert len(recorded) == steps
    for got, state in zip(recorded, states):
        assert got.dtype == torch.float64
        assert torch.equal(got, torch.from_numpy(state))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_i2v_experts_are_bit_exact_with_spec_loop(steps, mode, dtype):
    high, low = MockVelocity(seed=21, in_dim=36, dtype=dtype), MockVelocity(seed=22, in_dim=36, dtype=dtype)
    y = _condition()
    stats = SamplingStats()
    out = rcm_sample(
        high,
        _context(),
        SHAPE,
        seed=4,
        steps=steps,
        sigma_max=200.0,
        mode=mode,
        y=y,
        low_noise_model=low,
        stats=stats,
    )
    expected, used, _ = spec_sample(
        MockVelocity(seed=21, in_dim=36, dtype=dtype),
        MockVelocity(seed=22, in_dim=36, dtype=dtype),
        _context(),
        SHAPE,
        seed=4,
        steps=steps,
        sigma_max=200.0,
        ode=mode == "ode",
        y=y,
    )
    assert torch.equal(out, torch.from_numpy(expected))
    assert stats.step_models == used
    for call in high.calls + low.calls:
        assert call["y"].dtype == dtype and call["y"].shape == (SHAPE[0], 20, *SHAPE[2:])
        assert torch.equal(call["y"], y.expand(SHAPE[0], -1, -1, -1, -1).to(dtype))


@pytest.mark.parametrize(
    ("steps", "schedule"),
    [
        (1, ["high_noise"]),
        (2, ["high_noise", "high_noise"]),
        (3, ["high_noise", "high_noise", "low_noise"]),
        (4, ["high_noise", "high_noise", "low_noise", "low_noise"]),
    ],
)
@pytest.mark.parametrize("sigma_max", [200.0, 80.0])
def test_expert_switch_table(steps, schedule, sigma_max):
    high, low = MockVelocity(seed=1, in_dim=36), MockVelocity(seed=2, in_dim=36)
    stats = SamplingStats()
    rcm_sample(
        high,
        _context(),
        (1, 16, 1, 2, 2),
        steps=steps,
        sigma_max=sigma_max,
        y=torch.zeros(1, 20, 1, 2, 2),
        low_noise_model=low,
        stats=stats,
    )
    assert stats.step_models == schedule
    assert stats.steps_per_model.get("high_noise", 0) == [1, 2, 2, 2][steps - 1]
    assert len(high.calls) == schedule.count("high_noise")
    assert len(low.calls) == schedule.count("low_noise")
    assert set(stats.seconds_per_model) == set(schedule)


def test_expert_switch_is_one_way_and_keeps_one_expert_on_the_device(monkeypatch):
    high, low = MockVelocity(seed=1, in_dim=36), MockVelocity(seed=2, in_dim=36)
    where = {}
    monkeypatch.setattr(i2v, "move_module", lambda module, device: where.__setitem__(id(module), device))
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    switch = ExpertSwitch(high, low, 0.9, device=gpu, offload_device=cpu)
    devices = lambda: (where[id(high)], where[id(low)])  # noqa: E731
    assert devices() == (gpu, cpu)
    assert switch.select(0.99)[0] == "high_noise" and devices() == (gpu, cpu)
    assert switch.select(0.9)[0] == "high_noise"  # t == boundary stays on the high-noise expert
    assert switch.select(0.85)[0] == "low_noise" and devices() == (cpu, gpu)
    assert switch.select(0.95)[0] == "low_noise" and devices() == (cpu, gpu)


def test_same_seed_same_output_different_seed_different_output():
    model = MockVelocity(seed=3)
    a = rcm_sample(model, _context(), SHAPE, seed=42)
    b = rcm_sample(model, _context(), SHAPE, seed=42)
    c = rcm_sample(model, _context(), SHAPE, seed=43)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batch_shares_one_draw_and_repeats_conditioning():
    model = MockVelocity(seed=3)
    batch_context = _context().repeat(2, 1, 1)
    from_single = rcm_sample(model, _context(), SHAPE, seed=8)
    from_batch = rcm_sample(model, batch_context, SHAPE, seed=8)
    assert torch.equal(from_single, from_batch)
    assert all(call["context"].shape[0] == 2 for call in model.calls)
    assert not torch.equal(from_single[0], from_single[1])  # each sample gets its own slice of the draw


def test_callback_after_every_step():
    seen = []
    rcm_sample(
        MockVelocity(seed=1), _context(), (1, 16, 1, 2, 2), steps=3, callback=lambda s, n: seen.append((s, n))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("steps", [0, 5, -1, 2.0, True])
def test_bad_step_count(steps):
    with pytest.raises(ValueError, match="steps must be 1, 2, 3 or 4"):
        rcm_sample(MockVelocity(seed=1), _context(), SHAPE, steps=steps)


@pytest.mark.parametrize("sigma_max", [-1.0, 0.0, float("inf"), float("nan")])
def test_bad_sigma_max(sigma_max):
    with pytest.raises(ValueError, match="sigma_max must be a positive finite number"):
        rcm_sample(MockVelocity(seed=1), _context(), SHAPE, sigma_max=sigma_max)


def test_bad_mode_and_boundary():
    with pytest.raises(ValueError, match="unknown sampler mode 'euler'"):
        rcm_sample(MockVelocity(seed=1), _context(), SHAPE, mode="euler")
    with pytest.raises(ValueError, match="boundary must be"):
        rcm_sample(MockVelocity(seed=1), _context(), SHAPE, boundary=1.5)


def test_mismatched_expert_pairs():
    y = torch.zeros(1, 20, *SHAPE[2:])
    high = MockVelocity(seed=1, in_dim=36)
    with pytest.raises(ValueError, match="low-noise expert has in_dim 16"):
        rcm_sample(high, _context(), SHAPE, y=y, low_noise_model=MockVelocity(seed=2))
    with pytest.raises(ValueError, match="high-noise expert has in_dim 16"):
        rcm_sample(MockVelocity(seed=2), _context(), SHAPE, y=y, low_noise_model=high)
    with pytest.raises(ValueError, match=r"different architectures \(dim 256 vs 512\)"):
        rcm_sample(high, _context(), SHAPE, y=y, low_noise_model=MockVelocity(seed=2, in_dim=36, dim=512))
    with pytest.raises(ValueError, match="the same model was given"):
        rcm_sample(high, _context(), SHAPE, y=y, low_noise_model=high)


def test_conditioning_must_match_the_model_kind():
    with pytest.raises(ValueError, match="needs the conditioning latent y"):
        rcm_sample(MockVelocity(seed=1, in_dim=36), _context(), SHAPE)
    with pytest.raises(ValueError, match="but the model is a T2V model"):
        rcm_sample(MockVelocity(seed=1), _context(), SHAPE, y=torch.zeros(1, 20, *SHAPE[2:]))
    with pytest.raises(ValueError, match="y must have shape"):
        rcm_sample(MockVelocity(seed=1, in_dim=36), _context(), SHAPE, y=torch.zeros(1, 20, 3, 4, 4))


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 16, 3, 4), "shape must be"),
        ((1, 4, 3, 4, 4), "predicts 16 latent channels"),
        ((1, 16, 3, 5, 4), "must be even"),
    ],
)
def test_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        rcm_sample(MockVelocity(seed=1), _context(), shape)


def test_context_batch_must_be_one_or_the_sample_batch():
    with pytest.raises(ValueError, match="context has batch 3"):
        rcm_sample(MockVelocity(seed=1), _context(batch=3), SHAPE)


def test_context_width_must_match_the_model_and_the_message_shows_the_given_shape():
    context = _context()
    narrow = context[..., : context.shape[-1] // 2]
    with pytest.raises(ValueError, match=rf"width {narrow.shape[-1]} \(shape \(1, "):
        rcm_sample(MockVelocity(seed=1), narrow, (2, *SHAPE[1:]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_experts_one_resident_and_same_as_spec_loop_on_cuda():
    high, low = MockVelocity(seed=21, in_dim=36), MockVelocity(seed=22, in_dim=36)
    high.watch, low.watch = [low], [high]
    y = _condition()
    stats = SamplingStats()
    out = rcm_sample(
        high, _context(), SHAPE, seed=4, sigma_max=200.0, y=y, low_noise_model=low, device="cuda", stats=stats
    )
    assert out.device.type == "cuda"
    assert all(d == [torch.device("cpu")] for d in high.devices_of_others + low.devices_of_others)
    assert stats.step_models == ["high_noise", "high_noise", "low_noise", "low_noise"]
