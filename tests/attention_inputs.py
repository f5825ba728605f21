"""Inputs for the attention tests and benchmark: N(0, 1) tensors and structured "DiT-like" q, k, v.

DiT-like (KERNELS.md §5): q and k share random Fourier features of the (t, h, w) token grid (local, peaky
attention), q carries a large shared mean, k a shared channel bias of 3σ and four outlier channels (×4), and
v has a shared bias. All tensors are (B, L, H, D).
"""

from __future__ import annotations

import math

import torch


def random_qkv(b: int, l: int, h: int, d: int, *, seed: int, dtype=torch.bfloat16, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(b, l, h, d, generator=gen, device=device).to(dtype) for _ in range(3))


def token_grid(l: int, width: int = 52, height: int = 30) -> torch.Tensor:
    """(t, h, w) positions of L tokens laid out frame by frame (Wan 480p: 21 × 30 × 52)."""
    n = torch.arange(l)
    return torch.stack([n // (width * height), (n // width) % height, n % width], dim=1).float()


def dit_like_qkv(
    b: int,
    l: int,
    h: int,
    d: int,
    *,
    seed: int,
    dtype=torch.bfloat16,
    device="cpu",
    q_mean: float = 2.0,
    key_bias_sigmas: float = 3.0,
    width: int = 52,
    height: int = 30,
):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    pos = token_grid(l, width, height)
    freqs = torch.randn(3, d // 2, generator=gen) * torch.tensor([0.6, 0.35, 0.35])[:, None]
    phase = (pos @ freqs).to(device)
    features = torch.cat([phase.cos(), phase.sin()], dim=1) * math.sqrt(2.0)  # (L, D), unit variance

    def shared(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    def heads(amplitude: float, noise: float) -> torch.Tensor:
        mix = torch.linalg.qr(torch.randn(h, d, d, generator=gen))[0].to(device)  # a rotation per head
        x = amplitude * torch.einsum("ld,hde->lhe", features, mix)
        return x + noise * torch.randn(b, l, h, d, generator=noise_gen, device=device)

    q = heads(1.0, 0.5) + q_mean * shared(1, 1, h, d)
    k = heads(1.0, 0.5)
    k = k + key_bias_sigmas * k.std() * shared(1, 1, h, d)
    outliers = torch.randperm(d, generator=gen)[:4].to(device)
    k[..., outliers] *= 4.0
    v = torch.randn(b, l, h, d, generator=noise_gen, device=device) + shared(1, 1, h, d)
    return tuple(x.to(dtype) for x in (q, k, v))


def random_projection(d: int, *, seed: int, dtype=torch.float32, device="cpu") -> torch.nn.Linear:
    """An SLA proj_l with every parameter random (trained checkpoints have non-zero proj_l)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    proj = torch.nn.Linear(d, d)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(d, d, generator=gen) / math.sqrt(d))
        proj.bias.copy_(0.1 * torch.randn(d, generator=gen))
    return proj.to(device=device, dtype=dtype)
