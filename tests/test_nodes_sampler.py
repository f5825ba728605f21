"""TD_RCMSampler in-process: core-style conditioning, pairing errors, interrupt per block, progress."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from comfy_inprocess import import_comfy_and_nodes
from comfy_tiny_models import FILE_NAMES, write_tiny_dit


@pytest.fixture(scope="module")
def pack():
    model_management, nodes = import_comfy_and_nodes()
    return SimpleNamespace(mm=model_management, nodes=nodes)


@pytest.fixture(scope="module")
def models(pack, tmp_path_factory):
    from comfyui_turbodiffusion.nodes.model_patchers import wrap_module
    from comfyui_turbodiffusion.wan_models import load_dit

    folder = tmp_path_factory.mktemp("dits")
    patchers = {}
    for role in ("t2v", "i2v_high"):
        write_tiny_dit(folder, role)
        network = load_dit(folder / FILE_NAMES[role], dtype=torch.float32, attention="sdpa")
        cpu = torch.device("cpu")
        patchers[role] = wrap_module(network, cpu, cpu, FILE_NAMES[role], "dit")
    return patchers


def _prompt_context(length: int = 7) -> torch.Tensor:
    context = torch.zeros(1, 512, 64)
    context[:, :length] = torch.randn(1, length, 64, generator=torch.Generator().manual_seed(4))
    return context


def _sample(pack, model, positive, **kwargs):
    sampler = pack.nodes.NODE_CLASS_MAPPINGS["TD_RCMSampler"]()
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    arguments = dict(seed=3, steps=2, sigma_max=80.0, mode="sde") | kwargs
    return sampler.sample(model, positive, latent, **arguments)[0]


def test_core_clip_text_encode_conditioning_is_repadded_to_512(pack, models):
    context = _prompt_context()
    ours = _sample(pack, models["t2v"], [[context, {}]])
    # Core CLIPTextEncode may stop at the prompt's tokens and adds a pooled_output entry.
    core_style = _sample(pack, models["t2v"], [[context[:, :7].clone(), {"pooled_output": None}]])
    assert torch.equal(ours["samples"], core_style["samples"])
    assert ours["samples"].shape == (1, 16, 2, 4, 6)


def test_pairing_mistakes_are_explained(pack, models):
    context = _prompt_context()
    with pytest.raises(ValueError, match="Wan2.2 I2V expert .* needs a start image"):
        _sample(pack, models["i2v_high"], [[context, {}]])
    image = {"concat_latent_image": torch.zeros(1, 16, 2, 4, 6), "concat_mask": torch.ones(1, 1, 2, 4, 6)}
    with pytest.raises(ValueError, match="text-to-video model .* carries a start image"):
        _sample(pack, models["t2v"], [[context, image]])
    with pytest.raises(ValueError, match="umT5"):
        _sample(pack, models["t2v"], [[torch.zeros(1, 77, 768), {}]])
    with pytest.raises(ValueError, match="single prompt"):
        _sample(pack, models["t2v"], [[context, {}], [context, {}]])


def test_interrupt_is_checked_before_every_block(pack, models):
    mm = pack.mm
    blocks = models["t2v"].network.blocks
    calls = []

    def interrupt_after_first_block(module, args, output):
        calls.append(module)
        mm.interrupt_current_processing(True)

    handle = blocks[0].register_forward_hook(interrupt_after_first_block)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _sample(pack, models["t2v"], [[_prompt_context(), {}]])
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert calls == [blocks[0]], "the sampler must stop before the second block"
    assert not blocks[1]._forward_pre_hooks, "the interrupt hooks must be removed after sampling"


def test_progress_is_reported_per_step(pack, models):
    import comfy.utils

    updates = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: updates.append((value, total))
    )
    try:
        _sample(pack, models["t2v"], [[_prompt_context(), {}]], steps=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert updates == [(1, 3), (2, 3), (3, 3)]


def test_loader_block_swap_keeps_the_result(pack, tmp_path):
    import folder_paths

    write_tiny_dit(tmp_path, "t2v")
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    loader = pack.nodes.NODE_CLASS_MAPPINGS["TD_WanModelLoader"]()
    name = FILE_NAMES["t2v"]
    (resident,) = loader.load(name, "sdpa", 0.1, "fp32")
    (swapped,) = loader.load(name, "sdpa", 0.1, "fp32", swap_blocks=1)
    positive = [[_prompt_context(), {}]]
    assert torch.equal(
        _sample(pack, resident, positive)["samples"], _sample(pack, swapped, positive)["samples"]
    )
