"""No host-device synchronisation inside the sampling loop or the DiT forward (issue 8).

A GPU waits for nothing when the host never reads a device value: every `.item()`, `.tolist()`, `float(t)`,
`if t:` or copy to the CPU would stall the queue of kernels. The CPU cannot observe a stall, so the tests
observe the reads themselves: the sampler's loop under spies on every Tensor method that hands a value to
the host, and the DiT forward on the meta device, where any such read raises.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from comfyui_turbodiffusion.wan_models.attention import sdpa_attention
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import WanDiT
from comfyui_turbodiffusion.wan_models.sampler import SamplingStats, rcm_sample
from pipeline_mocks import TEXT_DIM, MockVelocity

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def spy_on_host_reads(log: list):
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name):
        def read(self, *args, **kwargs):
            log.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


class RecordingVelocity(MockVelocity):
    """Marks in the shared log where each network call starts."""

    def __init__(self, log: list, seed: int, **kwargs) -> None:
        super().__init__(seed, **kwargs)
        self.log = log

    def forward(self, x, t, context, y=None):
        self.log.append("network")
        return super().forward(x, t, context, y)


def _loop_reads(log: list) -> list:
    """The host reads between the first network call and the last step's callback."""
    first = log.index("network")
    last = len(log) - 1 - log[::-1].index("callback")
    return [entry for entry in log[first:last] if entry not in ("network", "callback")]


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("experts", [False, True])
def test_sampler_loop_reads_no_device_value(mode, experts):
    log: list = []
    in_dim = 36 if experts else 16
    model = RecordingVelocity(log, seed=1, in_dim=in_dim)
    low = RecordingVelocity(log, seed=2, in_dim=in_dim) if experts else None
    y = torch.zeros(1, 20, 2, 4, 4) if experts else None
    stats = SamplingStats()
    with spy_on_host_reads(log):
        rcm_sample(
            model,
            torch.randn(1, 512, TEXT_DIM),
            (1, 16, 2, 4, 4),
            mode=mode,
            y=y,
            low_noise_model=low,
            sigma_max=200.0 if experts else 80.0,
            callback=lambda step, total: log.append("callback"),
            stats=stats,
        )
    assert log.count("network") == 4
    assert _loop_reads(log) == []
    # What the loop no longer reads on the way is still reported afterwards.
    assert len(stats.timesteps) == 4 and all(isinstance(t, float) for t in stats.timesteps)
    assert stats.step_models == (["high_noise"] * 2 + ["low_noise"] * 2 if experts else ["model"] * 4)


def test_dit_forward_runs_on_the_meta_device():
    """Reading a meta tensor's value raises, so a forward there proves no value-dependent host logic."""
    config = WanDiTConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64, has_sla_proj=True)
    with torch.device("meta"):
        model = WanDiT(config, self_attention=sdpa_attention, cross_attention=sdpa_attention)
        x = torch.empty(1, 16, 2, 4, 6)
        out = model(x, torch.empty(1), torch.empty(1, 512, 64))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device.type == "meta"
