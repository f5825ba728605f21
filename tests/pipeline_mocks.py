"""Deterministic stand-ins for the Wan DiT used by the sampler tests, and a spec-derived reference loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

LATENT_CHANNELS = 16
TEXT_DIM = 8


def mock_config(in_dim: int = 16, dim: int = 256, **overrides) -> SimpleNamespace:
    fields = dict(
        dim=dim, ffn_dim=256, num_heads=2, num_layers=2, in_dim=in_dim, out_dim=16, text_dim=TEXT_DIM
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


class MockVelocity(torch.nn.Module):
    """A fixed nonlinear function of (x, t, context, y) with random weights, recording what it is fed.

    Computes in its parameters' dtype like the real DiT and returns float32.
    """

    def __init__(self, seed: int, in_dim: int = 16, dtype: torch.dtype = torch.float32, **config) -> None:
        super().__init__()
        self.config = mock_config(in_dim=in_dim, **config)
        gen = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter((torch.randn(LATENT_CHANNELS, in_dim, generator=gen) / 3).to(dtype))
        self.time_gain = torch.nn.Parameter(torch.randn(LATENT_CHANNELS, generator=gen).to(dtype))
        self.text = torch.nn.Parameter(torch.randn(TEXT_DIM, generator=gen).to(dtype))
        self.calls: list[dict] = []
        self.devices_of_others: list = []
        self.watch: list[torch.nn.Module] = []

    def forward(self, x, t, context, y=None):
        self.calls.append(
            dict(x_dtype=x.dtype, t=t.clone(), context=context.clone(), y=None if y is None else y.clone())
        )
        self.devices_of_others.append([next(m.parameters()).device for m in self.watch])
        inp = x if y is None else torch.cat([x, y], dim=1)
        h = torch.einsum("oc,bcthw->bothw", self.mix, inp)
        time = (t.to(self.mix.dtype) / 1000)[:, None, None, None, None]
        angle = time * self.time_gain[None, :, None, None, None]
        text = (context * self.text).mean(dim=(1, 2))[:, None, None, None, None]
        return (torch.tanh(h) * torch.cos(angle) + text + torch.sin(3 * angle)).float()


def _bf16_round(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) by bit manipulation; returns float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def spec_time_grid(steps: int, sigma_max: float) -> list[float]:
    """TURBODIFFUSION.md §4.1 with Python floats: t = sin τ / (cos τ + sin τ)."""
    angles = [math.atan(sigma_max), *[1.5, 1.4, 1.0][: steps - 1], 0.0]
    return [math.sin(a) / (math.cos(a) + math.sin(a)) for a in angles]


def spec_timestep(t: float) -> float:
    """TURBODIFFUSION.md §4.3: bf16(fp64(fp32(t)) · 1000)."""
    scaled = np.float64(np.float32(t)) * 1000.0
    return float(_bf16_round(np.array([scaled], dtype=np.float32))[0])


def _to_model_dtype(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float64:
        return torch.from_numpy(x.copy())
    as_fp32 = x.astype(np.float32)
    if dtype == torch.float32:
        return torch.from_numpy(as_fp32)
    assert dtype == torch.bfloat16
    return torch.from_numpy(_bf16_round(as_fp32)).to(torch.bfloat16)


def spec_sample(
    high,
    low,
    context: torch.Tensor,
    shape: tuple,
    *,
    seed: int,
    steps: int,
    sigma_max: float,
    ode: bool,
    y: torch.Tensor | None = None,
    boundary: float = 0.9,
) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """The sampler of TURBODIFFUSION.md §4.2 / §5.4 written out in numpy float64 (CPU generator).

    Returns the float32 result, the model label per step and the float64 state before every step.
    """
    dtype = next(high.parameters()).dtype
    ts = spec_time_grid(steps, sigma_max)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float32, generator=gen).numpy().astype(np.float64) * ts[0]
    batch = shape[0]
    ctx = context.expand(batch, -1, -1).to(dtype)
    cond = {} if y is None else {"y": y.expand(batch, -1, -1, -1, -1).to(dtype)}
    used, states, switched = [], [], False
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        if low is not None and not switched and t_cur < boundary:
            switched = True
        net = low if switched else high
        used.append("model" if low is None else ("low_noise" if switched else "high_noise"))
        states.append(x.copy())
        tau = torch.full((batch,), spec_timestep(t_cur), dtype=torch.float32)
        with torch.no_grad():
            v = net(_to_model_dtype(x, dtype), tau, ctx, **cond).numpy().astype(np.float64)
        if ode:
            x = x - (t_cur - t_next) * v
        else:
            fresh = torch.randn(shape, dtype=torch.float32, generator=gen).numpy()
            noise_term = (np.float32(t_next) * fresh).astype(np.float64)  # float32 product
            x = (1 - t_next) * (x - t_cur * v) + noise_term
    return x.astype(np.float32), used, states
