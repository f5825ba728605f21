"""The Wan DiT forward pass in bf16, written step by step from TURBODIFFUSION.md §2.1-2.8 (the rounding
points of TurboDiffusion's inference), as an independent reference for the model's low-precision numerics.
Works on an original-layout state dict with a 2-D patch embedding; q/k RoPE via complex numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
EPS = 1e-6


def spec_forward(state: dict[str, torch.Tensor], x, t, context, num_heads: int) -> torch.Tensor:
    dim = state["patch_embedding.bias"].shape[0]
    head_dim = dim // num_heads
    batch, channels, frames, height, width = x.shape
    rows, columns = height // 2, width // 2

    def linear(h, name):  # a GEMM in the operands' dtype
        return F.linear(h, state[name + ".weight"], state[name + ".bias"])

    def linear_fp32(h, name):  # inside autocast(float32): weights cast up
        return F.linear(h.float(), state[name + ".weight"].float(), state[name + ".bias"].float())

    def layer_norm(h, weight=None, bias=None):  # float32, rounded to the input dtype
        weight = None if weight is None else state[weight].float()
        bias = None if bias is None else state[bias].float()
        return F.layer_norm(h.float(), (dim,), weight, bias, EPS).to(h.dtype)

    def rms_norm(h, name):  # FastRMSNorm: weight multiply in float32, then the cast
        h32 = h.float()
        normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)
        return (normed * state[name + ".weight"].float()).to(h.dtype)

    def heads(h):
        return h.view(batch, -1, num_heads, head_dim)

    def attention(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)

    # §2.1 patchify: tokens (t, h, w), features (c, kh, kw)
    tokens = x.to(BF16).reshape(batch, channels, frames, 1, rows, 2, columns, 2)
    tokens = tokens.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, frames * rows * columns, channels * 4)
    h = linear(tokens, "patch_embedding")

    # §2.2 time: float64 sinusoid, cosines first, then float32 MLPs
    j = torch.arange(128, dtype=torch.float64)
    phases = t.double()[:, None] * torch.pow(torch.tensor(10000.0, dtype=torch.float64), -j / 128)
    sinusoid = torch.cat([phases.cos(), phases.sin()], dim=1).float()
    e = linear_fp32(F.silu(linear_fp32(sinusoid, "time_embedding.0")), "time_embedding.2")
    e0 = linear_fp32(F.silu(e), "time_projection.1").view(batch, 6, dim)

    # §2.3 text
    text = linear(
        F.gelu(linear(context.to(BF16), "text_embedding.0"), approximate="tanh"), "text_embedding.2"
    )

    # §2.4 RoPE: float32 angle table [22 | 21 | 21], interleaved pairs as complex numbers
    tables = []
    for axis, (size, width_of_axis) in enumerate(((frames, 44), (rows, 42), (columns, 42))):
        k = torch.arange(width_of_axis // 2, dtype=torch.float32)
        angles = torch.arange(size, dtype=torch.float32)[:, None] / torch.pow(
            torch.tensor(10000.0), 2 * k / width_of_axis
        )
        view = [1, 1, 1, width_of_axis // 2]
        view[axis] = size
        tables.append(angles.view(view).expand(frames, rows, columns, width_of_axis // 2))
    angle_table = torch.cat(tables, dim=-1).reshape(-1, head_dim // 2)
    rotation = torch.polar(torch.ones_like(angle_table), angle_table)[None, :, None, :]

    def rope(q):
        as_complex = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        return torch.view_as_real(as_complex * rotation).flatten(-2).to(q.dtype)

    # §2.5-2.7 blocks
    num_layers = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for index in range(num_layers):
        p = f"blocks.{index}."
        m = state[p + "modulation"].float() + e0
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, i : i + 1] for i in range(6))
        a = (layer_norm(h).float() * (1 + scale1) + shift1).to(BF16)
        q = rope(heads(rms_norm(linear(a, p + "self_attn.q"), p + "self_attn.norm_q")))
        k = rope(heads(rms_norm(linear(a, p + "self_attn.k"), p + "self_attn.norm_k")))
        v = heads(linear(a, p + "self_attn.v"))
        h = h + linear(attention(q, k, v), p + "self_attn.o") * gate1.to(BF16)
        normed = layer_norm(h, p + "norm3.weight", p + "norm3.bias")
        q = heads(rms_norm(linear(normed, p + "cross_attn.q"), p + "cross_attn.norm_q"))
        k = heads(rms_norm(linear(text, p + "cross_attn.k"), p + "cross_attn.norm_k"))
        v = heads(linear(text, p + "cross_attn.v"))
        h = h + linear(attention(q, k, v), p + "cross_attn.o")
        f = (layer_norm(h).float() * (1 + scale2) + shift2).to(BF16)
        h = h + linear(F.gelu(linear(f, p + "ffn.0"), approximate="tanh"), p + "ffn.2") * gate2.to(BF16)

    # §2.8 head in float32, unpatchify with channels fastest
    head = state["head.modulation"].float() + e[:, None]
    out = linear_fp32(layer_norm(h).float() * (1 + head[:, 1:2]) + head[:, 0:1], "head.head")
    out = out.view(batch, frames, rows, columns, 1, 2, 2, 16).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(batch, 16, frames, height, width)
