"""The library imports and computes without Triton (macOS, Windows without a Triton build): every op takes
its PyTorch path. Runs in a child process whose import system refuses `triton`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class RefuseTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton is not installed here")

    sys.meta_path.insert(0, RefuseTriton())
    import torch
    from comfyui_turbodiffusion.wan_models import WanVAE, make_block_ops, make_self_attention
    from comfyui_turbodiffusion.wan_models.linear_layers import Int8Linear

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 300, 2, 128) for _ in range(3))
    for backend in ("sdpa", "sla", "sagesla"):
        out = make_self_attention(backend, 0.5)(q, k, v, proj_l=torch.nn.Linear(128, 128))
        assert out.shape == q.shape and torch.isfinite(out).all(), backend
    vae = WanVAE(base_dim=8)
    video = vae.decode(torch.randn(1, 16, 2, 4, 4))
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()
    assert make_block_ops("auto") is not None
    layer = Int8Linear(128, 128, bias_dtype=torch.bfloat16)
    layer.int8_weight.random_(-127, 127)
    layer.scale.fill_(0.01)
    layer.bias.zero_()  # buffers start uninitialised (torch.empty)
    assert torch.isfinite(layer(torch.randn(3, 128, dtype=torch.bfloat16))).all()
    assert not any(name == "triton" or name.startswith("triton.") for name in sys.modules)
    print("ok")
    """
)


def test_library_runs_without_triton():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
