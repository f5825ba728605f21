"""The shipped workflows: canvas (UI) and API formats agree, name the release files, and fit the nodes."""

from __future__ import annotations

import pytest
from comfy_workflows import (
    WORKFLOW_NAMES,
    load_api_workflow,
    load_ui_workflow,
    strip_meta,
    ui_to_api,
    widget_slots,
)

# File names of the releases (TURBODIFFUSION.md §3.1, FORMATS.md §2, §3).
RELEASE_FILES = {
    "turbodiffusion_wan2.1_t2v_1.3b": {"TurboWan2.1-T2V-1.3B-480P.pth"},
    "turbodiffusion_wan2.2_i2v_a14b": {
        "TurboWan2.2-I2V-A14B-high-720P-quant.pth",
        "TurboWan2.2-I2V-A14B-low-720P-quant.pth",
    },
}
VAE_FILES = {"Wan2.1_VAE.pth", "wan_2.1_vae.safetensors"}
TEXT_ENCODER_FILES = {"umt5_xxl_fp16.safetensors", "models_t5_umt5-xxl-enc-bf16.pth"}
MODEL_FILE_INPUTS = {"model_name", "vae_name", "text_encoder_name", "image"}


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_is_canvas_format(name):
    workflow = load_ui_workflow(name)
    assert workflow["version"] == 0.4
    node_ids = {node["id"] for node in workflow["nodes"]}
    assert workflow["last_node_id"] == max(node_ids)
    assert workflow["last_link_id"] == max(row[0] for row in workflow["links"])
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        source_node = next(node for node in workflow["nodes"] if node["id"] == source)
        target_node = next(node for node in workflow["nodes"] if node["id"] == target)
        assert link_id in source_node["outputs"][source_slot]["links"]
        assert target_node["inputs"][target_slot]["link"] == link_id
        assert source_node["outputs"][source_slot]["type"] == link_type
    sampler = next(node for node in workflow["nodes"] if node["type"] == "TD_RCMSampler")
    assert sampler["widgets_values"][1] == "fixed"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflows_name_the_release_files(name):
    prompt = load_api_workflow(name)
    by_type = {}
    for node in prompt.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert {inputs["model_name"] for inputs in by_type["TD_WanModelLoader"]} == RELEASE_FILES[name]
    assert by_type["TD_VAELoader"][0]["vae_name"] in VAE_FILES
    assert by_type["TD_TextEncoderLoader"][0]["text_encoder_name"] in TEXT_ENCODER_FILES
    sampler = by_type["TD_RCMSampler"][0]
    assert sampler["sigma_max"] == (200 if "i2v" in name else 80)
    assert by_type["TD_SaveVideo"][0]["fps"] == 16


@pytest.mark.comfy
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_and_api_workflows_agree_with_the_nodes(comfy_host, name):
    object_info = comfy_host.client.object_info()
    workflow = load_ui_workflow(name)
    unknown = {node["type"] for node in workflow["nodes"]} - set(object_info)
    assert not unknown, f"{name} uses node types the server does not know: {unknown}"
    assert ui_to_api(workflow, object_info) == strip_meta(load_api_workflow(name))
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        for (input_name, real), value in zip(widget_slots(info), node["widgets_values"]):
            if not real or input_name in MODEL_FILE_INPUTS:
                continue
            spec = specs[input_name]
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], list):
                assert value in spec[0], f"{node['type']}.{input_name}: {value!r} not a choice"
            if "min" in options:
                assert options["min"] <= value <= options["max"], f"{node['type']}.{input_name}"
