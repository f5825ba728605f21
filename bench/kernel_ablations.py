"""Timing-only ablations of the SageSLA attention kernel (issue 5): each one rewrites a few lines of the
current `turbo_kernels/sparse_attention.py` so that one suspected cost disappears, and `attention_ab.py
--ablations NAME,...` times the result beside the shipped kernel. Their outputs are wrong by design (the
rel-L2 column shows how wrong); only the time says something: how much the removed part costs.

* fixed_block: every step reads the LUT's first key block, so the same 32 KB of K/V̂ᵀ cross L2 -> shared
  memory each step (same traffic, no scattered addresses, always L2 hits).
* hoisted_loads: the K and V̂ᵀ tiles are loaded once before the key loop; the loop only computes (the floor
  without any load or barrier wait).
"""

from __future__ import annotations

K_LOAD = "k = k_src.load([n, start, 0]).reshape(BLOCK_N, D)"
V_LOAD = "vt = v_src.load([n, 0, start]).reshape(D, BLOCK_N)"
LOOP = "    for i in range(steps):\n"

ABLATIONS: dict[str, list[tuple[str, str]]] = {
    "fixed_block": [
        ("kb = tl.load(lut_ptr + lut_row * k_max + i)", "kb = tl.load(lut_ptr + lut_row * k_max)")
    ],
    "hoisted_loads": [
        (
            LOOP,
            "    k_once = k_src.load([n, 0, 0]).reshape(BLOCK_N, D)\n"
            "    vt_once = v_src.load([n, 0, 0]).reshape(D, BLOCK_N)\n" + LOOP,
        ),
        (K_LOAD, "k = k_once"),
        (V_LOAD, "vt = vt_once"),
    ],
}


def ablated_source(source: str, name: str) -> str:
    """`source` (the kernel module's text) with the ablation `name` applied; every pattern must occur."""
    for old, new in ABLATIONS[name]:
        if old not in source:
            raise ValueError(f"ablation {name}: {old!r} no longer occurs in the kernel source")
        source = source.replace(old, new)
    return source
