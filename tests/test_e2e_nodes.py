"""Issue 8 in the nodes, in-process: per-stage timings in the log, the decode-and-save node that encodes while
decoding, the loader's forward mode, and Cancel between steps for replayed / compiled forwards."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import av
import pytest
import torch
from comfy_inprocess import import_comfy_and_nodes
from comfy_tiny_models import FILE_NAMES, write_tiny_dit
from vae_reference import random_original_state_dict


@pytest.fixture(scope="module")
def pack():
    model_management, nodes = import_comfy_and_nodes()
    return SimpleNamespace(mm=model_management, nodes=nodes)


@pytest.fixture(scope="module")
def dit_folder(pack, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("dits")
    write_tiny_dit(folder, "t2v")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return folder


@pytest.fixture(scope="module")
def vae(pack, tmp_path_factory):
    from comfyui_turbodiffusion.nodes.model_patchers import wrap_module
    from comfyui_turbodiffusion.wan_models import load_vae

    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(random_original_state_dict(base_dim=8, seed=3), path)
    cpu = torch.device("cpu")
    return wrap_module(load_vae(path, dtype=torch.float32), cpu, cpu, path.name, "vae")


def _load(pack, **options):
    loader = pack.nodes.NODE_CLASS_MAPPINGS["TD_WanModelLoader"]()
    return loader.load(FILE_NAMES["t2v"], "sdpa", 0.1, "fp32", **options)[0]


def _positive() -> list:
    context = torch.zeros(1, 512, 64)
    context[:, :7] = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(4))
    return [[context, {}]]


def _sample(pack, model, steps: int = 2) -> dict:
    sampler = pack.nodes.NODE_CLASS_MAPPINGS["TD_RCMSampler"]()
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    return sampler.sample(model, _positive(), latent, seed=3, steps=steps, sigma_max=80.0, mode="sde")[0]


def test_sampler_logs_its_timings(pack, dit_folder, caplog):
    with caplog.at_level(logging.INFO):
        _sample(pack, _load(pack), steps=3)
    assert "TurboDiffusion timing: sampling " in caplog.text and "(3 steps)" in caplog.text
    assert "TurboDiffusion timing: model transfer " in caplog.text


def test_loader_forward_mode_keeps_the_result(pack, dit_folder):
    from comfyui_turbodiffusion.wan_models.forward_modes import CudaGraphRunner

    plain, graphed = _load(pack), _load(pack, forward_mode="cudagraphs")
    assert isinstance(graphed.network.forward_runner, CudaGraphRunner)
    assert torch.equal(_sample(pack, plain)["samples"], _sample(pack, graphed)["samples"])


def test_replayed_forwards_are_interrupted_between_steps(pack, dit_folder):
    """Per-block hooks would run only while a graph is captured; the check moves to the model's forward."""
    mm = pack.mm
    model = _load(pack, forward_mode="cudagraphs")
    network = model.network
    forwards = []

    def interrupt_after_first_step(module, args, output):
        forwards.append(module)
        assert not any(block._forward_pre_hooks for block in network.blocks)
        mm.interrupt_current_processing(True)

    handle = network.register_forward_hook(interrupt_after_first_step)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _sample(pack, model, steps=4)
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert forwards == [network]
    assert not network._forward_pre_hooks, "the interrupt hook must be removed after sampling"


def test_decode_and_save_writes_the_video_while_decoding(pack, vae, tmp_path, caplog):
    import folder_paths
    from comfyui_turbodiffusion.nodes.comfy_latent import to_comfy_latent

    folder_paths.set_output_directory(str(tmp_path))
    latent = to_comfy_latent(torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5)))
    node = pack.nodes.NODE_CLASS_MAPPINGS["TD_DecodeAndSaveVideo"]()
    with caplog.at_level(logging.INFO):
        result = node.save(vae, latent, 16.0, "clips/Turbo", "mp4", 19, prompt={"1": {}})

    preview = result["ui"]["images"][0]
    assert preview == {"filename": "Turbo_00001_.mp4", "subfolder": "clips", "type": "output"}
    with av.open(str(tmp_path / "clips" / preview["filename"])) as container:
        assert container.metadata["prompt"] == '{"1": {}}'
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    assert [p.name for p in (tmp_path / "clips").iterdir()] == ["Turbo_00001_.mp4"]
    assert "TurboDiffusion timing: VAE decoding (encoding alongside)" in caplog.text
    assert "TurboDiffusion timing: video encoding (after decoding)" in caplog.text
