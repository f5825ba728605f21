"""Where each model of an I2V job is at every stage (issue 6: the whole A14B job within a VRAM budget).

Moves are recorded instead of performed: `move_module` is replaced by a recorder that keeps a virtual place
per module, with "meta" standing for the GPU (the sampling device of the expert switch and the text encoder's
`text_encoder_device`) and "cpu" for host memory, so the job runs on the CPU while the test checks the
placement protocol: the text encoder is on the GPU only while it encodes, one expert at a time is on the GPU,
the outgoing expert leaves before the incoming one arrives, and the VAE decodes with both experts home.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from comfyui_turbodiffusion.wan_models import generate_i2v, generate_t2v, i2v, pipeline, sampler
from comfyui_turbodiffusion.wan_models.vae import WanVAE
from PIL import Image
from pipeline_mocks import TEXT_DIM, MockVelocity

GPU = torch.device("meta")  # the stand-in for the accelerator: moves there are only recorded
CPU = torch.device("cpu")


class Placement:
    """The recorder: a virtual place per module, and a log of moves and model calls in order."""

    def __init__(self, **modules: torch.nn.Module) -> None:
        self.names = {id(module): name for name, module in modules.items()}
        self.where = {name: "cpu" for name in modules}
        self.log: list[tuple] = []

    def move(self, module: torch.nn.Module, device: torch.device) -> None:
        name = self.names[id(module)]
        self.where[name] = torch.device(device).type
        self.log.append(("move", name, self.where[name]))

    def call(self, what: str) -> None:
        self.log.append((what, dict(self.where)))

    def calls(self, what: str) -> list[dict]:
        return [entry[1] for entry in self.log if entry[0] == what]


class TextEncoder(torch.nn.Module):
    def __init__(self, placement: Placement) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(
            torch.randn(256, TEXT_DIM, generator=torch.Generator().manual_seed(1))
        )
        self.placement = placement

    def encode(self, prompts):
        self.placement.call("text encode")
        ids = torch.tensor([[ord(c) % 256 for c in p[:10]] for p in prompts])
        return self.table[ids].detach()


class VAE(torch.nn.Module):
    def __init__(self, placement: Placement) -> None:
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(16, 3, generator=torch.Generator().manual_seed(2)))
        self.placement = placement
        self.decode_kwargs: list[dict] = []

    def encode(self, video):
        self.placement.call("vae encode")
        grouped = torch.cat([video[:, :, :1], video[:, :, 1::4]], dim=2)
        return torch.einsum("oc,bcthw->bothw", self.down, torch.nn.functional.avg_pool3d(grouped, (1, 8, 8)))

    def decode(self, latent, **kwargs):
        self.placement.call("vae decode")
        self.decode_kwargs.append(kwargs)
        video = torch.tanh(latent[:, :3]).repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        return torch.cat([video[:, :, :1], video[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)


class Expert(MockVelocity):
    def __init__(self, seed: int, name: str) -> None:
        super().__init__(seed=seed, in_dim=36)
        self.name = name
        self.placement: Placement | None = None

    def forward(self, x, t, context, y=None):
        self.placement.call(f"{self.name} step")
        return super().forward(x, t, context, y)


def _image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))


@pytest.fixture
def job(monkeypatch):
    """Models wired to one recorder; the expert switch sends the active expert to the GPU stand-in."""
    placement = Placement()
    high, low = Expert(6, "high"), Expert(7, "low")
    text, vae = TextEncoder(placement), VAE(placement)
    placement.__init__(high=high, low=low, text=text, vae=vae)
    high.placement = low.placement = placement
    monkeypatch.setattr(pipeline, "move_module", placement.move)
    monkeypatch.setattr(i2v, "move_module", placement.move)
    switch = functools.partial(i2v.ExpertSwitch, offload_device=CPU)
    monkeypatch.setattr(
        sampler, "ExpertSwitch", lambda high, low, boundary, device: switch(high, low, boundary, GPU)
    )
    return placement, high, low, text, vae


def _run(job, **options):
    _, high, low, text, vae = job
    return generate_i2v(
        high,
        low,
        vae,
        _image(),
        prompt="a dog runs",
        text_encoder=text,
        width=32,
        height=16,
        num_frames=9,
        steps=4,
        **options,
    )


def test_text_encoder_is_on_the_gpu_only_while_it_encodes(job):
    placement = job[0]
    _run(job, text_encoder_device="meta")

    assert [entry for entry in placement.log if entry[0] == "move" and entry[1] == "text"] == [
        ("move", "text", "meta"),
        ("move", "text", "cpu"),
    ]
    assert [where["text"] for where in placement.calls("text encode")] == ["meta"]
    for stage in ("vae encode", "high step", "low step", "vae decode"):
        assert all(where["text"] == "cpu" for where in placement.calls(stage)), stage


def test_text_encoder_stays_where_it_is_by_default(job):
    placement = job[0]
    _run(job)
    _run(job, text_encoder_device="cpu")  # its own device: nothing to move

    assert not [entry for entry in placement.log if entry[0] == "move" and entry[1] == "text"]


def test_one_expert_on_the_gpu_at_a_time_and_both_home_before_decoding(job):
    placement = job[0]
    result = _run(job, text_encoder_device="meta")

    assert result.steps_per_model == {"high_noise": 2, "low_noise": 2}
    assert all(w["high"] == "meta" and w["low"] == "cpu" for w in placement.calls("high step"))
    assert all(w["low"] == "meta" and w["high"] == "cpu" for w in placement.calls("low step"))
    (decoding,) = placement.calls("vae decode")
    assert decoding["high"] == decoding["low"] == decoding["text"] == "cpu"
    # At the switch the high-noise expert leaves before the low-noise expert arrives.
    expert_moves = [
        entry[1:] for entry in placement.log if entry[0] == "move" and entry[1] in ("high", "low")
    ]
    switch = expert_moves.index(("low", "meta"))
    assert expert_moves[switch - 1] == ("high", "cpu")
    first_low_step = next(i for i, entry in enumerate(placement.log) if entry[0] == "low step")
    last_high_step = max(i for i, entry in enumerate(placement.log) if entry[0] == "high step")
    moves_between = [
        entry[1:] for entry in placement.log[last_high_step:first_low_step] if entry[0] == "move"
    ]
    assert moves_between == [("high", "cpu"), ("low", "meta")]


def test_decode_budget_reaches_the_vae_only_when_given(job):
    vae = job[4]
    _run(job)
    _run(job, decode_vram_budget_gib=7.5)

    assert vae.decode_kwargs == [{}, {"vram_budget_gib": 7.5}]


def _tiny_vae() -> WanVAE:
    vae = WanVAE(base_dim=8).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in vae.named_parameters():
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
            scale = 0.2 if name.endswith(("bias", "gamma")) else 1 / fan_in**0.5
            tensor.copy_(
                torch.randn(tensor.shape, generator=generator) * scale + (1 if "gamma" in name else 0)
            )
    return vae


def test_budgeted_decode_gives_the_same_video_and_a_too_small_budget_is_named():
    dit, vae = MockVelocity(seed=4), _tiny_vae()
    context = torch.randn(1, 16, TEXT_DIM, generator=torch.Generator().manual_seed(5))
    options = dict(context=context, width=32, height=32, num_frames=9, steps=2)
    plain = generate_t2v(dit, vae, **options)
    budgeted = generate_t2v(dit, vae, decode_vram_budget_gib=4.0, **options)

    # An untiled budget plan decodes the same function (more frames per pass); float32 on the CPU.
    assert vae.decode_plan(plain.latent.shape, vram_budget_gib=4.0).tiled is False
    torch.testing.assert_close(budgeted.frames, plain.frames, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"a VRAM budget of 0\.01 GiB is too small to decode"):
        generate_t2v(dit, vae, decode_vram_budget_gib=0.01, **options)
