"""The pack inside a real ComfyUI server: every node registered, with the public contract of issue 4."""

from __future__ import annotations

import pytest
import requests
from comfy_server import comfy_host as host_tools
from comfy_workflows import WORKFLOW_NAMES, load_ui_workflow

pytestmark = pytest.mark.comfy
PACK_FOLDER = host_tools.PACK_FOLDER_NAME

PACK_NODES = {
    "TD_WanModelLoader": (("model_name", "attention", "sla_topk", "weight_dtype"), ("TD_WAN_MODEL",)),
    "TD_TextEncoderLoader": (("text_encoder_name", "device"), ("TD_TEXT_ENCODER",)),
    "TD_TextEncode": (("text_encoder", "text"), ("CONDITIONING",)),
    "TD_VAELoader": (("vae_name",), ("TD_WAN_VAE",)),
    "TD_EmptyVideoLatent": (("resolution", "aspect_ratio", "num_frames", "batch_size"), ("LATENT",)),
    "TD_ImageToVideo": (
        ("vae", "positive", "start_image", "resolution", "aspect_ratio", "adaptive_resolution", "num_frames"),
        ("CONDITIONING", "LATENT"),
    ),
    "TD_RCMSampler": (
        ("model", "positive", "latent", "seed", "steps", "sigma_max", "mode", "low_noise_model", "boundary"),
        ("LATENT",),
    ),
    "TD_VAEDecode": (("vae", "samples"), ("IMAGE",)),
    "TD_SaveVideo": (("images", "fps", "filename_prefix", "format", "crf"), ()),
    "TD_FreeVRAM": (("anything", "unload_models", "empty_cache"), ("*",)),
}

# (node, input) -> the default the node table gives.
TABLE_DEFAULTS = {
    ("TD_WanModelLoader", "attention"): "sagesla",
    ("TD_WanModelLoader", "sla_topk"): 0.1,
    ("TD_WanModelLoader", "weight_dtype"): "auto",
    ("TD_TextEncoderLoader", "device"): "default",
    ("TD_EmptyVideoLatent", "num_frames"): 81,
    ("TD_EmptyVideoLatent", "batch_size"): 1,
    ("TD_ImageToVideo", "adaptive_resolution"): True,
    ("TD_ImageToVideo", "num_frames"): 81,
    ("TD_RCMSampler", "seed"): 0,
    ("TD_RCMSampler", "steps"): 4,
    ("TD_RCMSampler", "sigma_max"): 80,
    ("TD_RCMSampler", "mode"): "sde",
    ("TD_RCMSampler", "boundary"): 0.9,
    ("TD_SaveVideo", "fps"): 16,
    ("TD_SaveVideo", "filename_prefix"): "TurboDiffusion",
    ("TD_SaveVideo", "format"): "mp4",
    ("TD_SaveVideo", "crf"): 19,
    ("TD_FreeVRAM", "unload_models"): True,
    ("TD_FreeVRAM", "empty_cache"): True,
}

TABLE_CHOICES = {
    ("TD_WanModelLoader", "attention"): ["sagesla", "sla", "sdpa"],
    ("TD_WanModelLoader", "weight_dtype"): ["auto", "bf16", "fp16", "fp32"],
    ("TD_TextEncoderLoader", "device"): ["default", "cpu"],
    ("TD_EmptyVideoLatent", "aspect_ratio"): ["16:9", "9:16", "1:1", "4:3", "3:4"],
    ("TD_RCMSampler", "mode"): ["sde", "ode"],
    ("TD_SaveVideo", "format"): ["mp4", "webm", "gif", "webp"],
}


@pytest.fixture(scope="module")
def object_info(comfy_host):
    return comfy_host.client.object_info()


def _inputs(info: dict) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def _options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 else {}


def test_pack_imports_without_errors(comfy_host, object_info):
    log = comfy_host.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "TurboDiffusion" in line]
    assert not failed, f"the pack failed to import:\n{comfy_host.log_tail(80)}"
    missing = sorted(set(PACK_NODES) - set(object_info))
    assert not missing, f"nodes missing from /object_info: {missing}\n{comfy_host.log_tail(80)}"


@pytest.mark.parametrize("node_id", sorted(PACK_NODES))
def test_node_contract(object_info, node_id):
    info = object_info[node_id]
    names, outputs = PACK_NODES[node_id]
    inputs = _inputs(info)
    for name in names:
        assert name in inputs, f"{node_id} lacks input {name}"
    assert tuple(info["output"]) == outputs
    assert info["category"] == "TurboDiffusion"
    assert info["display_name"].startswith("TurboDiffusion ")
    assert len(info["description"]) > 20
    for name, spec in inputs.items():
        assert _options(spec).get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["output_node"] == (node_id in ("TD_SaveVideo", "TD_FreeVRAM"))


def test_table_defaults_and_choices(object_info):
    for (node_id, name), default in TABLE_DEFAULTS.items():
        spec = _inputs(object_info[node_id])[name]
        assert _options(spec).get("default") == default, f"{node_id}.{name}"
    for (node_id, name), choices in TABLE_CHOICES.items():
        assert _inputs(object_info[node_id])[name][0] == choices, f"{node_id}.{name}"
    latent_inputs = _inputs(object_info["TD_EmptyVideoLatent"])
    assert latent_inputs["resolution"][0][:2] == ["480p", "720p"]
    assert _options(latent_inputs["num_frames"])["step"] == 4
    sampler = _inputs(object_info["TD_RCMSampler"])
    assert (_options(sampler["steps"])["min"], _options(sampler["steps"])["max"]) == (1, 4)
    assert _options(sampler["seed"])["control_after_generate"] is True
    assert "low_noise_model" in object_info["TD_RCMSampler"]["input"]["optional"]
    topk = _options(_inputs(object_info["TD_WanModelLoader"])["sla_topk"])
    assert (topk["min"], topk["max"]) == (0.01, 1.0)
    assert _options(_inputs(object_info["TD_TextEncode"])["text"])["multiline"] is True


def test_model_folders_are_listed(comfy_host):
    base = comfy_host.base / "models"
    (base / "diffusion_models" / "listed_dit.safetensors").write_bytes(b"")
    (base / "vae" / "listed_vae.pth").write_bytes(b"")
    info = comfy_host.client.get("/object_info/TD_WanModelLoader")["TD_WanModelLoader"]
    assert "listed_dit.safetensors" in info["input"]["required"]["model_name"][0]
    info = comfy_host.client.get("/object_info/TD_VAELoader")["TD_VAELoader"]
    assert "listed_vae.pth" in info["input"]["required"]["vae_name"][0]
    (base / "diffusion_models" / "listed_dit.safetensors").unlink()
    (base / "vae" / "listed_vae.pth").unlink()


def test_workflow_templates_are_served(comfy_host):
    """The canvas workflows show in the template browser, with their thumbnails (COMFYUI_HOST.md §4.5)."""
    templates = comfy_host.client.get("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == list(WORKFLOW_NAMES)
    for name in WORKFLOW_NAMES:
        served = f"{comfy_host.client.url}/api/workflow_templates/{PACK_FOLDER}/{name}"
        assert requests.get(f"{served}.json", timeout=30).json() == load_ui_workflow(name)
        thumbnail = requests.get(f"{served}.jpg", timeout=30)
        assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"
