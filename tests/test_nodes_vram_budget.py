"""TD_RCMSampler's max_vram_gb (issue 6, item 3): the block swap derived from a GPU memory budget.

A 6-block tiny DiT (a 2-block one cannot save memory by swapping: the two staging slots hold as much as the
blocks) is sampled with a budget placed half a block above what k swapped blocks need, from the byte counts
of its weights and the library's activation estimate (tested in test_block_swap.py). The swapped model
must give bit-identical latents to the resident one, swap exactly k blocks, report the smaller size to
ComfyUI, keep the swap on a re-queue, and a budget too small must end in a node error naming a budget that
works, after which the server runs the next prompt.
"""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import pytest
import torch
from comfy_inprocess import import_comfy_and_nodes
from comfy_prompts import assert_succeeded, t2v_prompt
from comfy_tiny_models import turbodiffusion_release_state
from comfy_workflows import node_id_of
from comfyui_turbodiffusion.wan_models import load_dit
from comfyui_turbodiffusion.wan_models.block_swap import (
    active_block_swap,
    enable_block_swap,
    estimate_activation_bytes,
    plan_block_swap,
)
from dit_reference import TINY, diffusers_wan_class, randomise_
from safetensors.torch import load_file

LAYERS = 6
SLOTS = 2
DEEP_FILES = {16: "tiny-deep-TurboWan2.1-T2V.pth", 36: "tiny-deep-TurboWan2.2-I2V-high.pth"}
DEEP_LOW_I2V = "tiny-deep-TurboWan2.2-I2V-low.pth"
GIB = 2**30


def _write_deep_dit(path, in_channels: int, seed: int) -> None:
    model = diffusers_wan_class()(in_channels=in_channels, **(TINY | {"num_layers": LAYERS})).eval()
    randomise_(model, seed)
    torch.save(turbodiffusion_release_state(model, seed), path)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _weights(module: torch.nn.Module) -> int:
    return _bytes([*module.parameters(), *module.buffers()])


def _budget_for(network: torch.nn.Module, swapped: int, latent_shape: tuple[int, ...]) -> float:
    """GiB halfway between what `swapped` (>= SLOTS) and `swapped - 1` streamed blocks need: resident blocks
    + slots + the other weights + activations. The sampler's state (a few hundred KB here) fits the half
    block of slack (about 1.3 MB)."""
    block = _weights(network.blocks[0])
    other = _weights(network) - LAYERS * block
    batch, _, frames, height, width = latent_shape
    activations = estimate_activation_bytes(network.config, frames * (height // 2) * (width // 2), batch)
    on_device = LAYERS - swapped + SLOTS
    return (other + activations + (on_device + 0.5) * block) / GIB


def _state_size_swapped(network: torch.nn.Module, swapped: int) -> int:
    """What ComfyUI's module_size must count once a resident `network` streams `swapped` blocks: its state
    dict without the swapped blocks, plus two slot copies of a block."""
    state = network.state_dict()
    streamed = tuple(f"blocks.{i}." for i in range(LAYERS - swapped, LAYERS))
    kept = _bytes([t for key, t in state.items() if not key.startswith(streamed)])
    block = _bytes([t for key, t in state.items() if key.startswith("blocks.0.")])
    return kept + SLOTS * block


# ---------------------------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def pack():
    model_management, nodes = import_comfy_and_nodes()
    return SimpleNamespace(mm=model_management, nodes=nodes)


@pytest.fixture(scope="module")
def deep_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deep_dits")
    _write_deep_dit(folder / DEEP_FILES[36], 36, seed=21)
    _write_deep_dit(folder / DEEP_LOW_I2V, 36, seed=22)
    return folder


def _patcher(folder, name):
    from comfyui_turbodiffusion.nodes.model_patchers import wrap_module

    network = load_dit(folder / name, dtype=torch.float32, attention="sdpa")
    cpu = torch.device("cpu")
    return wrap_module(network, cpu, cpu, name, "dit")


def test_a_swapping_model_is_planned_like_the_resident_one(deep_files):
    network = load_dit(deep_files / DEEP_FILES[36], dtype=torch.float32, attention="sdpa")
    budget = _budget_for(network, 4, (1, 16, 2, 4, 6))
    resident = plan_block_swap(network, budget, 12)

    enable_block_swap(network, 3)

    assert resident.swapped_blocks == 4
    assert plan_block_swap(network, budget, 12) == resident


def test_i2v_expert_pair_under_a_budget_is_bit_identical_and_keeps_its_swap(pack, deep_files, caplog):
    high, low = _patcher(deep_files, DEEP_FILES[36]), _patcher(deep_files, DEEP_LOW_I2V)
    generator = torch.Generator().manual_seed(8)
    context = torch.zeros(1, 512, TINY["text_dim"])
    context[:, :5] = torch.randn(1, 5, TINY["text_dim"], generator=generator)
    image = {
        "concat_latent_image": torch.randn(1, 16, 2, 4, 6, generator=generator),
        "concat_mask": torch.ones(1, 1, 2, 4, 6),
    }
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    sampler = pack.nodes.NODE_CLASS_MAPPINGS["TD_RCMSampler"]()

    def sample(**budget):
        arguments = dict(seed=5, steps=3, sigma_max=200.0, mode="sde", low_noise_model=low) | budget
        return sampler.sample(high, [[context, image]], latent, **arguments)[0]["samples"]

    expected = sample()
    budget = _budget_for(high.network, 4, latent["samples"].shape)
    swapped_size = _state_size_swapped(high.network, 4)
    with caplog.at_level("INFO"):
        swapped = sample(max_vram_gb=budget)
    swaps = [active_block_swap(p.network) for p in (high, low)]
    again = sample(max_vram_gb=budget)

    assert torch.equal(swapped, expected) and torch.equal(again, expected)
    assert [swap.swapped_blocks for swap in swaps] == [4, 4]
    assert [active_block_swap(p.network) for p in (high, low)] == swaps, "a re-run must not re-swap"
    assert high.model_size() == swapped_size
    assert caplog.text.count("swaps 4 of 6 blocks (was 0") == 2


def test_a_budget_turns_off_the_expert_prefetch(pack, deep_files, monkeypatch):
    """Both experts on the GPU at once would exceed a budget planned for one, so the sampler asks the
    library not to upload the low-noise expert early when max_vram_gb is set."""
    high, low = _patcher(deep_files, DEEP_FILES[36]), _patcher(deep_files, DEEP_LOW_I2V)
    seen = []

    def fake_sample(*args, **kwargs):
        seen.append(kwargs["prefetch_experts"])
        return torch.zeros(args[2])

    context = torch.zeros(1, 512, TINY["text_dim"])
    image = {"concat_latent_image": torch.zeros(1, 16, 2, 4, 6), "concat_mask": torch.ones(1, 1, 2, 4, 6)}
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    sampler = pack.nodes.NODE_CLASS_MAPPINGS["TD_RCMSampler"]()
    node_module = sys.modules[type(sampler).__module__]
    monkeypatch.setattr(node_module.wan_models, "rcm_sample", fake_sample)
    arguments = dict(seed=5, steps=3, sigma_max=200.0, mode="sde", low_noise_model=low)
    sampler.sample(high, [[context, image]], latent, **arguments)
    budget = _budget_for(high.network, 4, latent["samples"].shape)
    sampler.sample(high, [[context, image]], latent, **arguments, max_vram_gb=budget)
    assert seen == [True, False]


# ------------------------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def deep_t2v(comfy_host, tiny):
    path = comfy_host.base / "models" / "diffusion_models" / DEEP_FILES[16]
    _write_deep_dit(path, 16, seed=20)
    return load_dit(path, dtype=torch.float32, attention="sdpa")


def _latent_prompt(tiny, seed: int, max_vram_gb: float) -> dict:
    """The shipped T2V workflow on the 6-block DiT in float32, ending in core SaveLatent."""
    prompt = t2v_prompt(
        tiny,
        seed=seed,
        TD_WanModelLoader={"model_name": DEEP_FILES[16], "attention": "sdpa", "weight_dtype": "fp32"},
        TD_RCMSampler={"steps": 2, "max_vram_gb": max_vram_gb},
    )
    sampler = node_id_of(prompt, "TD_RCMSampler")
    for class_type in ("TD_VAEDecode", "TD_SaveVideo", "TD_VAELoader"):
        del prompt[node_id_of(prompt, class_type)]
    prompt["80"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [sampler, 0], "filename_prefix": "latents/vram_budget"},
    }
    return prompt


def _run(host, prompt):
    """(result, the server log written while it ran)."""
    start = len(host.log())
    result = host.client.run(prompt)
    return result, host.log()[start:]


def _saved_latent(host, result) -> torch.Tensor:
    (saved,) = result.outputs["80"]["latents"]
    return load_file(str(host.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def _loaded_dit_sizes(host) -> list[float]:
    loaded = host.client.get("/turbodiffusion/models")["loaded"]
    return [model["size_mb"] for model in loaded if model["label"] == DEEP_FILES[16]]


@pytest.mark.comfy
def test_budget_input_is_listed_with_its_tooltip(comfy_host):
    info = comfy_host.client.get("/object_info/TD_RCMSampler")["TD_RCMSampler"]
    kind, options = info["input"]["optional"]["max_vram_gb"]
    assert kind == "FLOAT"
    assert (options["default"], options["min"]) == (0.0, 0.0)
    for phrase in ("weights + activations", "CPU memory", "same output", "try 22"):
        assert phrase in options["tooltip"]


@pytest.mark.comfy
def test_budget_swaps_blocks_bit_identically_and_a_too_small_one_says_what_fits(comfy_host, tiny, deep_t2v):
    shape = (1, 16, 3, 6, 8)  # SMALL_VIDEO: 9 frames of 64 x 48 pixels
    resident, resident_log = _run(comfy_host, _latent_prompt(tiny, seed=9, max_vram_gb=0))
    assert_succeeded(resident, comfy_host)
    assert "max_vram_gb" not in resident_log
    assert _saved_latent(comfy_host, resident).shape == shape

    budget = _budget_for(deep_t2v, 4, shape)
    swapped, swapped_log = _run(comfy_host, _latent_prompt(tiny, seed=9, max_vram_gb=budget))
    assert_succeeded(swapped, comfy_host)
    assert torch.equal(_saved_latent(comfy_host, swapped), _saved_latent(comfy_host, resident))
    assert f"'{DEEP_FILES[16]}' swaps 4 of 6 blocks (was 0" in swapped_log, swapped_log
    assert _loaded_dit_sizes(comfy_host) == pytest.approx([_state_size_swapped(deep_t2v, 4) / 2**20])

    requeued, requeued_log = _run(comfy_host, _latent_prompt(tiny, seed=10, max_vram_gb=budget))
    assert_succeeded(requeued, comfy_host)
    assert f"'{DEEP_FILES[16]}' keeps its 4 swapped blocks of 6 (4 needed" in requeued_log, requeued_log
    assert " swaps " not in requeued_log
    assert _loaded_dit_sizes(comfy_host) == pytest.approx([_state_size_swapped(deep_t2v, 4) / 2**20])

    too_small, _ = _run(comfy_host, _latent_prompt(tiny, seed=9, max_vram_gb=0.001))
    assert too_small.status == "error"
    error = too_small.first("execution_error")
    assert error["node_type"] == "TD_RCMSampler"
    message = error["exception_message"]
    assert "max_vram_gb=0.001 is too small" in message and DEEP_FILES[16] in message, message
    suggested = float(re.search(r"Set max_vram_gb to at least ([0-9.]+)", message).group(1))

    recovered, _ = _run(comfy_host, _latent_prompt(tiny, seed=9, max_vram_gb=suggested))
    assert_succeeded(recovered, comfy_host)
    assert torch.equal(_saved_latent(comfy_host, recovered), _saved_latent(comfy_host, resident))
