"""The single attention entry point of the Wan DiT.

Every attention function takes q, k, v in (B, L, H, D) layout and returns (B, L, H, D) in q's dtype.
Self-attention functions also receive the layer's SLA `proj_l` module (None when the checkpoint has none).
`make_self_attention` is the one place that maps a backend name to a function and decides fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]
SELF_ATTENTION_BACKENDS = ("sdpa",)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l: torch.nn.Module | None = None
) -> torch.Tensor:
    """Dense softmax attention, scale 1/sqrt(D), no mask. `proj_l` is ignored."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def make_self_attention(name: str = "sdpa", sla_topk: float = 0.1) -> AttentionFn:
    """The self-attention function for a backend name."""
    if name == "sdpa":
        return sdpa_attention
    choices = ", ".join(SELF_ATTENTION_BACKENDS)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {choices}")
