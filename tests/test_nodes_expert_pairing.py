"""TD_RCMSampler's low_noise_model input: a wrong expert is explained in the node's own terms (what to load or
disconnect), not in the library's keyword arguments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from comfy_inprocess import import_comfy_and_nodes
from comfy_tiny_models import FILE_NAMES, write_tiny_dit


@pytest.fixture(scope="module")
def pack():
    _, nodes = import_comfy_and_nodes()
    return SimpleNamespace(nodes=nodes)


@pytest.fixture(scope="module")
def experts(pack, tmp_path_factory):
    from comfyui_turbodiffusion.nodes.model_patchers import wrap_module
    from comfyui_turbodiffusion.wan_models import load_dit

    folder = tmp_path_factory.mktemp("dits")
    cpu = torch.device("cpu")
    patchers = {}
    for role in ("t2v", "i2v_high"):
        write_tiny_dit(folder, role)
        network = load_dit(folder / FILE_NAMES[role], dtype=torch.float32, attention="sdpa")
        patchers[role] = wrap_module(network, cpu, cpu, FILE_NAMES[role], "dit")
    return patchers


def _i2v_sample(pack, model, low_noise_model):
    context = torch.zeros(1, 512, 64)
    context[:, :5] = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    image = {"concat_latent_image": torch.zeros(1, 16, 2, 4, 6), "concat_mask": torch.ones(1, 1, 2, 4, 6)}
    sampler = pack.nodes.NODE_CLASS_MAPPINGS["TD_RCMSampler"]()
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    return sampler.sample(
        model, [[context, image]], latent, 0, 2, 200.0, "sde", low_noise_model=low_noise_model
    )


def test_text_to_video_model_as_low_noise_expert_is_explained(pack, experts):
    with pytest.raises(ValueError) as error:
        _i2v_sample(pack, experts["i2v_high"], experts["t2v"])
    message = str(error.value)
    assert message.startswith("TD_RCMSampler: low_noise_model")
    assert FILE_NAMES["t2v"] in message and "TurboWan2.2-I2V-A14B-low-720P" in message
    assert "disconnect low_noise_model" in message and "=None" not in message


def test_same_model_as_both_experts_is_explained(pack, experts):
    with pytest.raises(ValueError) as error:
        _i2v_sample(pack, experts["i2v_high"], experts["i2v_high"])
    message = str(error.value)
    assert message.startswith("TD_RCMSampler: model and low_noise_model are the same model")
    assert "second TD_WanModelLoader" in message and "=None" not in message
